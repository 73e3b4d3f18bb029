"""Ring mirror replicas behind the vLLM adapter's expert maps (no vLLM needed)."""

import pytest
import torch

from resilient_ep.engines.vllm import replicas
from resilient_ep.engines.vllm.replicas import RingReplicas


def test_all_live_is_vllms_linear_placement():
    ring = RingReplicas(8, 4)
    for r in range(4):
        active = ring.active_map(r)
        owned = [e for e in range(8) if active[e] >= 0]
        assert owned == [2 * r, 2 * r + 1]  # vLLM's own block for rank r
        assert active[2 * r:2 * r + 2].tolist() == [0, 1]  # in its first local slots


def test_each_expert_on_two_ranks_and_one_death_uncovers_nothing():
    ring = RingReplicas(8, 4)
    held = [ring.held_map(r) for r in range(4)]
    for e in range(8):
        assert sum(int(h[e] >= 0) for h in held) == 2
    for dead in range(4):
        live = torch.ones(4, dtype=torch.bool)
        live[dead] = False
        assert ring.uncovered(live) == []
        actives = [ring.active_map(r, live) for r in range(4) if r != dead]
        for e in range(8):  # active on exactly one live rank, in a slot it holds
            owners = [a for a in actives if a[e] >= 0]
            assert len(owners) == 1
    assert ring.uncovered(torch.tensor([True, False, False, True])) == [4, 5]  # block 2's holders
    assert ring.layout.replica_count.tolist() == [[2] * 8]  # the core's layout, one row


def test_two_ranks_full_mirror():
    ring = RingReplicas(8, 2)
    assert ring.local_count() == 8
    assert ring.active_map(0, torch.tensor([True, False])).tolist() == list(range(8))


def test_uneven_refused():
    with pytest.raises(ValueError, match="multiple"):
        RingReplicas(7, 2)


def test_registered_maps_rewritten_in_place():
    ring = RingReplicas(8, 2)
    t = torch.zeros(8, dtype=torch.int32)
    ptr = t.data_ptr()
    replicas.register_active_map(t, ring, 0)
    try:
        assert t.tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
        replicas.set_dead_ranks({1})
        assert t.tolist() == list(range(8)) and t.data_ptr() == ptr
        assert replicas.membership().epoch == 1
        assert replicas.membership().live_mask.tolist() == [True, False]
    finally:
        replicas.reset()
