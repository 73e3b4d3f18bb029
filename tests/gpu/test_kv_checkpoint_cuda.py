"""KV checkpoints of a CUDA paged cache: copies on a side stream into pinned host memory, after
the step's writes (event), never reading a block after its request was forgotten and reused."""

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
from resilient_ep.runtime.kv_cache import PagedKVCache

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BS = 16


def _write(cache, rid, start, end, value_base):
    table = cache.block_table(rid)
    pos = torch.arange(start, end, device="cuda")
    slots = torch.tensor(table, device="cuda")[pos // BS] * BS + pos % BS
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time first: the writes land late on the stream,
    for layer in range(cache.num_layers):  # so a copy that did not wait for them would read stale data
        k = (pos.float()[:, None, None] + value_base + layer).expand(-1, cache.num_kv_heads, cache.head_dim)
        cache.write(layer, slots, k, -k)


def test_cuda_save_restore_and_reuse_after_forget():
    base = default_shm_dir(f"rep-gpu-{uuid.uuid4().hex[:8]}")
    spec = StoreSpec("shm", 1, base_dir=str(base))
    cfg = KVCheckpointConfig(interval_tokens=BS, store="shm")
    cache = PagedKVCache(2, 64, BS, 2, 64, device="cuda")
    ck = KVCheckpointer(0, cache, cfg, spec, members={0}).start()
    try:
        for it in range(5):
            rid = f"r{it}"
            n = 40  # one size: the pinned host buffer is cached after the first save
            cache.reserve(rid, n + 32)
            _write(cache, rid, 0, n, 1000.0 * it)
            ck.after_step([(rid, list(range(n + 32)), n, cache.block_table(rid))])  # no sync
            _write(cache, rid, n, n + 32, -5.0)          # later positions keep changing
            res = None
            if it % 2:  # forget at once: blocks are reused by another request right away
                ck.forget(rid)
                cache.free(rid)
                cache.reserve("other", 64 * BS // 2)
                _write(cache, "other", 0, 64 * BS // 2, 7.0)
                cache.free("other")
            assert ck.flush(time.monotonic() + 30) and ck.errored() is None
            if it % 2 == 0:
                ck.restore(rid, list(range(n + 32)))
                assert ck.flush(time.monotonic() + 30)
                (res,) = ck.restored()
                assert res.restored_tokens == n
                dst = PagedKVCache(2, 64, BS, 2, 64, device="cuda")
                t = dst.reserve(rid, n)
                dst.write_blocks(t[: res.blocks.shape[0]], from_block_major(res.blocks).cuda())
                for layer in range(2):
                    k0, v0 = cache.gather(layer, cache.block_table(rid), n)
                    k1, v1 = dst.gather(layer, t, n)
                    assert torch.equal(k0, k1) and torch.equal(v0, v1)
                ck.forget(rid)
                cache.free(rid)
        assert ck.counters["saves"] >= 3
    finally:
        ck.shutdown()
        shutil.rmtree(base, ignore_errors=True)
