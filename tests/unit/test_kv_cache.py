"""PagedKVCache: allocator, per-request tables, write/gather, whole-block read/write."""

import pytest
import torch

from resilient_ep.runtime.kv_cache import BlockAllocator, OutOfBlocksError, PagedKVCache, slot_mapping

L, NB, BS, KVH, D = 2, 8, 4, 2, 3


def make_cache() -> PagedKVCache:
    return PagedKVCache(L, NB, BS, KVH, D, torch.float32)


def test_allocator_hands_out_lowest_free_and_reuses_freed():
    a = BlockAllocator(5)
    assert a.allocate(2) == [0, 1]
    assert a.allocate(1) == [2]
    a.free([0])
    assert a.num_free == 3
    assert a.allocate(2) == [0, 3]


def test_allocator_out_of_blocks_takes_nothing():
    a = BlockAllocator(3)
    a.allocate(2)
    with pytest.raises(OutOfBlocksError, match="asked for 2 KV blocks but only 1 of 3 are free"):
        a.allocate(2)
    assert a.num_free == 1


def test_allocator_rejects_double_free():
    a = BlockAllocator(3)
    ids = a.allocate(1)
    a.free(ids)
    with pytest.raises(ValueError, match="block 0 is not allocated"):
        a.free(ids)


def test_reserve_grows_table_and_free_returns_blocks():
    kv = make_cache()
    assert kv.reserve("a", 5) == [0, 1]  # 5 tokens, block size 4 -> 2 blocks
    assert kv.reserve("b", 1) == [2]
    assert kv.reserve("a", 8) == [0, 1]  # still fits
    assert kv.reserve("a", 9) == [0, 1, 3]
    assert kv.num_free_blocks == NB - 4
    kv.free("a")
    assert kv.num_free_blocks == NB - 1
    assert kv.block_table("b") == [2]
    with pytest.raises(KeyError, match="'a' has no KV blocks"):
        kv.block_table("a")


def test_reserve_out_of_blocks_names_request():
    kv = make_cache()
    kv.reserve("a", NB * BS - BS)
    with pytest.raises(OutOfBlocksError, match="request 'b' needs 2 more KV blocks for 5 tokens"):
        kv.reserve("b", 5)
    with pytest.raises(KeyError):
        kv.block_table("b")  # a failed first reservation leaves no table behind
    assert kv.num_free_blocks == 1


def test_slot_mapping_crosses_blocks():
    assert slot_mapping([7, 2], 2, 4, 4).tolist() == [30, 31, 8, 9]
    with pytest.raises(ValueError, match="need 3 blocks"):
        slot_mapping([7, 2], 6, 3, 4)


def test_write_then_gather_returns_positions_in_order():
    kv = make_cache()
    table = kv.reserve("r", 6)  # [0, 1]
    kv.reserve("x", 1)
    table = kv.reserve("r", 10)  # [0, 1, 3]: not contiguous
    k = torch.randn(10, KVH, D)
    v = torch.randn(10, KVH, D)
    # Write in two chunks, as a chunked prefill would.
    kv.write(1, slot_mapping(table, 0, 7, BS), k[:7], v[:7])
    kv.write(1, slot_mapping(table, 7, 3, BS), k[7:], v[7:])
    gk, gv = kv.gather(1, table, 10)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    gk, _ = kv.gather(0, table, 10)
    assert not gk.any()  # other layer untouched
    # gather_slots: any index shape, e.g. [B=2, Nmax=3] (a padded batch of decode requests).
    slots = torch.stack([slot_mapping(table, 0, 3, BS), slot_mapping(table, 7, 3, BS)])
    sk, sv = kv.gather_slots(1, slots)
    assert sk.shape == (2, 3, KVH, D)
    assert torch.equal(sk[1], k[7:]) and torch.equal(sv[0], v[:3])


def test_write_checks_shapes():
    kv = make_cache()
    with pytest.raises(ValueError, match=r"must both be \[T, 2, 3\]"):
        kv.write(0, torch.tensor([0]), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"slots \(2,\) must be \[1\]"):
        kv.write(0, torch.tensor([0, 1]), torch.zeros(1, KVH, D), torch.zeros(1, KVH, D))


def test_read_write_blocks_round_trip_to_other_cache():
    src, dst = make_cache(), make_cache()
    table = src.reserve("r", 7)
    k, v = torch.randn(7, KVH, D), torch.randn(7, KVH, D)
    for layer in range(L):
        src.write(layer, slot_mapping(table, 0, 7, BS), k + layer, v - layer)
    blocks = src.read_blocks(table)
    assert blocks.shape == (L, 2, len(table), BS, KVH, D)
    dst.reserve("pad", 3)  # the restored request lands on other block ids
    new_table = dst.reserve("r", 7)
    ptr = dst.kv.data_ptr()
    dst.write_blocks(new_table, blocks)
    assert dst.kv.data_ptr() == ptr
    for layer in range(L):
        gk, gv = dst.gather(layer, new_table, 7)
        assert torch.equal(gk, k + layer) and torch.equal(gv, v - layer)
    # read_blocks is a copy: changing the cache afterwards does not change it.
    src.kv.zero_()
    assert blocks.abs().sum() > 0


def test_write_blocks_checks_shape_and_ids():
    kv = make_cache()
    with pytest.raises(ValueError, match="must be"):
        kv.write_blocks([0], torch.zeros(L, 2, 2, BS, KVH, D))
    with pytest.raises(ValueError, match=r"out of range \[0, 8\)"):
        kv.read_blocks([8])


def test_adopt_registers_external_table():
    kv = make_cache()
    ids = kv.allocator.allocate(2)
    kv.adopt("r", ids)
    assert kv.block_table("r") == ids
    kv.free("r")
    assert kv.num_free_blocks == NB
