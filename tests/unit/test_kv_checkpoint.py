"""KVCheckpointer on a real paged cache and real stores, in one process (fast)."""

import shutil
import time
import uuid

import pytest
import torch

from resilient_ep.config import KVCheckpointConfig
from resilient_ep.kv.checkpoint import KVCheckpointer
from resilient_ep.kv.dir_store import default_shm_dir
from resilient_ep.kv.locations import StoreSpec
from resilient_ep.kv.meta import from_block_major
from resilient_ep.kv.peer_store import PeerStoreServer
from resilient_ep.runtime.kv_cache import PagedKVCache

BS = 4


@pytest.fixture
def shm_dir():
    d = default_shm_dir(f"rep-test-{uuid.uuid4().hex[:8]}")
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


def _cache():
    return PagedKVCache(2, 32, BS, 2, 3)


def _fill(cache, rid, tokens, upto):
    """Write deterministic K/V for positions < upto of rid (what a step would have done)."""
    table = cache.reserve(rid, len(tokens))
    for layer in range(cache.num_layers):
        pos = torch.arange(upto)
        slots = torch.tensor(table)[pos // BS] * BS + pos % BS
        k = (pos[:, None, None] * 10 + layer + torch.arange(6).view(1, 2, 3)).float()
        cache.write(layer, slots, k, -k)
    return table


def _step(ck, cache, reqs):
    return ck.after_step((rid, toks, n, cache.block_table(rid)) for rid, toks, n in reqs)


def _ckpt(cache, spec, owner=0, interval=4, members=(0, 1, 2)):
    cfg = KVCheckpointConfig(interval_tokens=interval, store=spec.kind, replicas=spec.replicas, timeout_ms=1000)
    return KVCheckpointer(owner, cache, cfg, spec, members=members).start()


def _restore(ck, rid, tokens):
    ck.restore(rid, tokens)
    assert ck.flush(time.monotonic() + 5)
    (res,) = ck.restored()
    return res


def test_incremental_saves_restore_and_forget(shm_dir):
    spec = StoreSpec("shm", replicas=1, base_dir=shm_dir)
    a, b = _cache(), _cache()
    ck = _ckpt(a, spec)
    other = _ckpt(b, spec, owner=1)
    try:
        toks = list(range(100, 130))
        _fill(a, "r", toks, 10)
        assert _step(ck, a, [("r", toks, 10)]) == 1
        assert _step(ck, a, [("r", toks, 12)]) == 0, "not due: 2 < interval_tokens"
        assert ck.flush(time.monotonic() + 5)
        assert ck.counters["blocks"] == 3  # blocks 0, 1, 2 (partial)
        _fill(a, "r", toks, 14)
        _step(ck, a, [("r", toks, 14)])
        assert ck.flush(time.monotonic() + 5)
        assert ck.counters["blocks"] == 3 + 2, "only block 2 (grown) and block 3 (new) are copied"
        rep = ck.report()
        assert rep["acks"] == [("r", 10, 0, ["shm:0"]), ("r", 14, 0, ["shm:0"])] and rep["lag_tokens_max"] == 0

        # Another rank restores it: 14 tokens from the checkpoint, the rest recomputed.
        res = _restore(other, "r", toks[:17])
        assert res.restored_tokens == 14 and res.recomputed_tokens == 2 and res.source == "shm:0"
        table = b.reserve("r", 17)
        b.write_blocks(table[:4], from_block_major(res.blocks))
        for layer in range(2):
            ka, va = a.gather(layer, a.block_table("r"), 14)
            kb, vb = b.gather(layer, table, 14)
            assert torch.equal(ka, kb) and torch.equal(va, vb)
        # A different token sequence is never restored from it; nor is a request without one.
        assert _restore(other, "r", [1] * 17).restored_tokens == 0
        assert _restore(other, "nope", toks).restored_tokens == 0
        # At most len(tokens) - 1: the last token is fed to the model for the logits.
        assert _restore(other, "r", toks[:14]).restored_tokens == 13

        ck.forget("r")
        a.free("r")
        assert ck.flush(time.monotonic() + 5)
        assert spec.open("shm:0").rids(time.monotonic() + 1) == []
        assert ck.errored() is None and other.errored() is None
    finally:
        ck.shutdown()
        other.shutdown()


def test_corrupt_replica_falls_back_to_the_other_then_to_recompute(shm_dir):
    spec = StoreSpec("shm", replicas=2, base_dir=shm_dir)
    a = _cache()
    ck = _ckpt(a, spec)
    try:
        toks = list(range(40))
        _fill(a, "r", toks, 20)
        _step(ck, a, [("r", toks, 20)])
        assert ck.flush(time.monotonic() + 5)
        for i, expect in ((0, ("shm:1", 20, 1)), (1, (None, 0, 2))):
            f = spec.open(f"shm:{i}")._files("r")[0]
            raw = bytearray(f.read_bytes())
            raw[3] ^= 0x40
            f.write_bytes(bytes(raw))
            res = _restore(ck, "r", toks[:25])
            assert (res.source, res.restored_tokens, res.checksum_mismatches) == expect
    finally:
        ck.shutdown()


def test_new_target_gets_a_full_copy_after_membership_change(tmp_path):
    servers = [PeerStoreServer(f"ipc://{tmp_path}/kvstore-{r}", location=f"peer:{r}").start() for r in range(3)]
    spec = StoreSpec("peer", replicas=1, peer_endpoints=tuple(s.endpoint for s in servers))
    a = _cache()
    ck = _ckpt(a, spec)
    try:
        toks = list(range(30))
        _fill(a, "r", toks, 12)
        _step(ck, a, [("r", toks, 12)])
        assert ck.flush(time.monotonic() + 5)
        assert servers[1].store.rids(0) == ["r"] and servers[2].store.rids(0) == []
        servers[1].shutdown()           # the replica holder dies
        ck.configure(1, {0, 2})         # the owner re-replicates on rank 2 at once
        assert ck.flush(time.monotonic() + 5)
        assert servers[2].store.rids(0) == ["r"]
        assert ck.report()["acks"][-1] == ("r", 12, 1, ["peer:2"])

        # Rank 1 rejoins with an empty store: it is the target again and gets a full copy.
        servers[1] = PeerStoreServer(servers[1].endpoint, location="peer:1").start()
        ck.configure(2, {0, 1, 2})
        assert ck.flush(time.monotonic() + 5)
        assert servers[1].store.rids(0) == ["r"] and ck.counters["save_errors"] == 0

        ck.paused = True
        _fill(a, "r", toks, 20)
        assert _step(ck, a, [("r", toks, 20)]) == 0, "paused: checkpointing off"
    finally:
        ck.shutdown()
        for s in servers:
            s.shutdown()


def test_layer_list_view_saves_opaque_blocks(shm_dir):
    """An engine's own layout (one tensor per layer, blocks on dim 0; vLLM CPU: [NB, KVH, BS, 2D])."""
    from resilient_ep.kv.cache_views import LayerListView

    layers = [torch.randn(16, 2, BS, 6) for _ in range(3)]
    view = LayerListView(layers, BS)
    assert view.block_shape == (3, 2, BS, 6)
    spec = StoreSpec("shm", replicas=1, base_dir=shm_dir)
    ck = _ckpt(view, spec)
    try:
        toks = list(range(20))
        ck.after_step([("r", toks, 9, [5, 2, 11])])
        res = _restore(ck, "r", toks)
        assert res.restored_tokens == 9 and res.blocks.shape == (3, 3, 2, BS, 6)
        other = LayerListView([torch.zeros(16, 2, BS, 6) for _ in range(3)], BS)
        other.write(torch.tensor([0, 1, 2]), res.blocks)
        for a, b in zip(layers, other.layers):
            assert torch.equal(a[[5, 2, 11]], b[:3])
    finally:
        ck.shutdown()
