"""Conformance test every KV checkpoint store passes (memory, peer, shm, file), plus metadata."""

import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import zmq

from resilient_ep.kv.dir_store import FileStore, ShmStore, default_shm_dir
from resilient_ep.kv.meta import (CheckpointMeta, block_crcs, from_block_major, to_block_major,
                                  token_crc, verified_blocks)
from resilient_ep.kv.peer_store import PeerStore, PeerStoreServer
from resilient_ep.kv.store import MemoryStore, StoreError

BS, SHAPE = 4, (2, 2, 4, 2, 3)  # block_size, one block (L, 2, BS, KVH, D)


def _blocks(n, seed=0):
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _meta(rid, num_tokens, blocks, *, epoch=0, owner=0, tokens=None):
    nb = -(-num_tokens // BS)
    tokens = tokens if tokens is not None else list(range(num_tokens))
    return CheckpointMeta(rid, num_tokens, BS, epoch, owner, tuple(range(nb)),
                          tuple(block_crcs(blocks[:nb])), token_crc(tokens[:num_tokens]), SHAPE, "float32")


@dataclass
class Harness:
    store: object
    corrupt: Callable[[str], None]   # flip a byte of block 0 of rid, behind the store's back
    kill: Callable[[], None]         # the store dies (its copies with it)
    close: Callable[[], None]
    configure: Callable | None = None  # membership as the store's owner sets it (default: the store's)


def _memory(tmp_path):
    s = MemoryStore("memory:0")

    def corrupt(rid):
        s._blocks[rid][0].view(-1)[0] += 1.0

    def kill():
        s._meta.clear()
        s._blocks.clear()
    return Harness(s, corrupt, kill, lambda: None)


def _peer(tmp_path):
    ctx = zmq.Context()
    server = PeerStoreServer(f"ipc://{tmp_path}/kvstore-0", location="peer:0", ctx=ctx).start()
    client = PeerStore(server.endpoint, "peer:0", ctx=ctx)

    def corrupt(rid):
        server.store._blocks[rid][0].view(-1)[0] += 1.0

    def close():
        client.shutdown()
        server.shutdown()
        ctx.term()
    def configure(epoch, members):  # the server's rank applies membership; the client follows
        server.configure(epoch, members)
        client.configure(epoch, members)
    return Harness(client, corrupt, server.shutdown, close, configure)


def _dir(kind):
    def make(tmp_path):
        if kind == "shm":
            path = default_shm_dir(f"rep-test-{uuid.uuid4().hex[:8]}") / "store-0"
            s = ShmStore(path)
        else:
            path = tmp_path / "file" / "store-0"
            s = FileStore(path)

        def corrupt(rid):
            f = s._files(rid)[0]
            raw = bytearray(f.read_bytes())
            raw[5] ^= 0xFF
            f.write_bytes(bytes(raw))
        return Harness(s, corrupt, lambda: shutil.rmtree(path, ignore_errors=True),
                       lambda: shutil.rmtree(path.parent, ignore_errors=True))
    return make


def _peer_tcp(tmp_path):
    """The peer store between hosts: TCP, CURVE under the instance key."""
    from resilient_ep.runtime.rank_processes import free_port_base
    from resilient_ep.transport import curve, wire

    if not curve.available():
        pytest.skip("libzmq without CURVE")
    wire.set_key(b"k" * 32, tag=False)
    ctx = zmq.Context()
    server = PeerStoreServer(f"tcp://127.0.0.1:{free_port_base(1)}", location="peer:0",
                             ctx=ctx).start()
    client = PeerStore(server.endpoint, "peer:0", ctx=ctx)

    def corrupt(rid):
        server.store._blocks[rid][0].view(-1)[0] += 1.0

    def close():
        client.shutdown()
        server.shutdown()
        ctx.term()
        wire.set_key(None)

    def configure(epoch, members):
        server.configure(epoch, members)
        client.configure(epoch, members)
    return Harness(client, corrupt, server.shutdown, close, configure)


STORES = [pytest.param(_memory, id="memory"), pytest.param(_peer, id="peer"),
          pytest.param(_peer_tcp, id="peer_tcp_curve"),
          pytest.param(_dir("shm"), id="shm"), pytest.param(_dir("file"), id="file")]


@pytest.mark.parametrize("make", STORES)
def test_store_conformance(tmp_path, make):
    h = make(tmp_path)
    s = h.store
    dl = lambda: time.monotonic() + 5  # noqa: E731
    try:
        (h.configure or s.configure)(1, {0, 1})
        assert s.head("a", dl()) is None and s.get("a", dl()) is None and s.rids(dl()) == []

        # A full save of 10 tokens (3 blocks), then an incremental one of 14 (blocks 2 and 3 only).
        data = _blocks(4)
        m1 = _meta("a", 10, data, epoch=1)
        s.put(m1, 0, data[:3], dl())
        assert s.head("a", dl()) == m1
        meta, got = s.get("a", dl())
        assert meta == m1 and torch.equal(got, data[:3]) and verified_blocks(meta, got) == 3
        data2 = data.clone()
        data2[2] += 1  # the partial block 2 gained tokens
        m2 = _meta("a", 14, data2, epoch=1)
        s.put(m2, 2, data2[2:4], dl())
        meta, got = s.get("a", dl())
        assert meta == m2 and torch.equal(got, data2) and verified_blocks(meta, got) == 4

        # Saves that would leave a hole, or come from an older epoch, or from a non-member: refused.
        m3 = _meta("a", 24, _blocks(6), epoch=1)
        with pytest.raises(StoreError, match="holds 4 blocks"):
            s.put(m3, 5, _blocks(6)[5:], dl())
        with pytest.raises(StoreError, match="older"):
            s.put(_meta("a", 18, _blocks(5), epoch=0), 4, _blocks(5)[4:], dl())
        with pytest.raises(StoreError, match="not a member"):
            s.put(_meta("b", 4, _blocks(1), owner=7, epoch=1), 0, _blocks(1), dl())
        assert s.get("a", dl())[0] == m2, "a refused save changes nothing"

        # A second request; a corrupted block is detected by its checksum (the prefix before it survives).
        mb = _meta("b", 8, _blocks(2, seed=1), epoch=1)
        s.put(mb, 0, _blocks(2, seed=1), dl())
        assert s.rids(dl()) == ["a", "b"]
        h.corrupt("b")
        meta, got = s.get("b", dl())
        assert verified_blocks(meta, got) == 0

        # Delete forgets one request only.
        s.delete("b", dl())
        assert s.head("b", dl()) is None and s.rids(dl()) == ["a"]
        s.delete("b", dl())  # no-op

        # A store that dies: its calls fail within their deadline (never hang).
        h.kill()
        t0 = time.monotonic()
        try:
            got = s.get("a", time.monotonic() + 0.3)
        except (StoreError, TimeoutError):
            got = None
        assert got is None
        assert time.monotonic() - t0 < 2.0
        assert s.errored() is None or isinstance(s.errored(), Exception)
    finally:
        s.shutdown()
        h.close()


@pytest.mark.parametrize("make", STORES)
def test_a_dead_store_loses_only_its_own_copies(tmp_path, make):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ha, hb = make(tmp_path / "a"), make(tmp_path / "b")
    try:
        data = _blocks(2)
        m = _meta("r", 8, data)
        for h in (ha, hb):
            h.store.put(m, 0, data, time.monotonic() + 5)
        ha.kill()
        meta, got = hb.store.get("r", time.monotonic() + 5)
        assert meta == m and torch.equal(got, data)
    finally:
        for h in (ha, hb):
            h.store.shutdown()
            h.close()


def test_meta_round_trip_and_layout():
    kv = torch.randn(2, 2, 5, BS, 2, 3)  # [L, 2, NB, BS, KVH, D]
    ids = torch.tensor([3, 1])
    bm = to_block_major(kv.index_select(2, ids))
    assert bm.shape == (2, *SHAPE) and bm.is_contiguous()
    assert torch.equal(from_block_major(bm), kv.index_select(2, ids))
    m = _meta("x", 7, bm)
    assert CheckpointMeta.from_dict(m.to_dict()) == m
    assert m.num_blocks == 2 and m.block_bytes == 2 * 2 * BS * 2 * 3 * 4
    assert token_crc([4, 5, 6], token_crc([1, 2, 3])) == token_crc([1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="need 2 checksums"):
        CheckpointMeta("x", 7, BS, 0, 0, (), (1,), 0, SHAPE, "float32")


def test_peer_copies_leave_the_owners_node_and_spread():
    from resilient_ep.kv.locations import StoreSpec

    one = StoreSpec("peer", 1, peer_endpoints=tuple("abcd"))
    assert [one.targets(o, range(4)) for o in range(4)] == [["peer:1"], ["peer:2"], ["peer:3"], ["peer:0"]]
    two = StoreSpec("peer", 1, peer_endpoints=tuple("abcd"), peer_nodes=(0, 0, 1, 1))
    # each owner's copy on its mirror partner, on the other node
    assert [two.targets(o, range(4)) for o in range(4)] == [["peer:2"], ["peer:3"], ["peer:0"], ["peer:1"]]
    assert two.targets(0, [0, 1]) == ["peer:1"]  # the other node gone: a node-mate is better than none
    three = StoreSpec("peer", 2, peer_endpoints=tuple("abcdef"), peer_nodes=(0, 0, 1, 1, 2, 2))
    assert three.targets(0, range(6)) == ["peer:2", "peer:3"]
    with pytest.raises(ValueError, match="peer_nodes"):
        StoreSpec("peer", 1, peer_endpoints=tuple("ab"), peer_nodes=(0,))


def test_a_store_the_newest_membership_left_out_answers_at_once(tmp_path):
    """A call made under an older membership to a rank the newer one left out (a node that
    lost power: its TCP connections stay up, nothing answers) gives up at once, whether the
    store was open before the news or is opened after it."""
    from resilient_ep.kv.locations import StoreSet, StoreSpec

    spec = StoreSpec("peer", 1, peer_endpoints=(f"ipc://{tmp_path}/a", f"ipc://{tmp_path}/b"))
    ctx = zmq.Context()
    stores = StoreSet(spec, ctx=ctx)
    try:
        stores.configure(1, {0, 1})
        stores.abort_outside({0})              # the news, from the decode thread
        s = stores.get("peer:1")               # opened after it
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="aborted"):
            s.head("r", time.monotonic() + 5)
        stores.configure(1, {0, 1})            # an I/O job made under the older membership
        with pytest.raises(StoreError, match="aborted"):
            stores.get("peer:1").head("r", time.monotonic() + 5)
        assert time.monotonic() - t0 < 2.0
    finally:
        stores.shutdown()
        ctx.term()
