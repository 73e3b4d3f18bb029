import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_ep.layout import ExpertLayout, LayoutError
from resilient_ep.placement import place
from resilient_ep.routing import RoutingTable

import pytest


def test_select_uses_only_live_replicas_and_spreads():
    lay = ExpertLayout.from_mapping([[0, 1, 2, 3, 0, 1]], num_ranks=2, num_experts=4)  # S=3
    t = RoutingTable(lay)
    ids = torch.tensor([[0, 1]] * 4)
    sel = t.select(0, ids)
    assert not sel.any_missing
    assert set(sel.slots[:, 0].tolist()) == {0, 4}, "expert 0's tokens alternate its replicas"
    t.update(live_mask=torch.tensor([False, True]), epoch=1)
    sel = t.select(0, torch.tensor([[0, 1], [2, 3]]))
    # Rank 0 (slots 0-2: experts 0, 1, 2) is dead; rank 1 holds 3, 0, 1 in slots 3-5.
    assert sel.slots.tolist() == [[4, 5], [-1, 3]]
    assert sel.missing.tolist() == [[False, False], [True, False]]
    assert t.uncovered() == [(0, 2)]
    assert int(t.epoch) == 1


def test_update_keeps_storage():
    lay = place(num_layers=3, num_experts=8, num_ranks=4, slots_per_rank=3, max_replicas=3)
    t = RoutingTable(lay)
    ptrs = t.storage_ptrs()
    new = place(torch.arange(1, 9, dtype=torch.float64), num_layers=3, num_experts=8, num_ranks=4,
                slots_per_rank=3, max_replicas=3)
    t.update(new, torch.tensor([True, False, True, True]), epoch=7)
    assert t.storage_ptrs() == ptrs
    assert torch.equal(t.physical_to_logical, new.physical_to_logical)
    with pytest.raises(LayoutError, match="does not fit"):
        t.update(ExpertLayout.trivial(3, 8, 2, 4))


@settings(max_examples=60, deadline=None)
@given(R=st.integers(2, 6), S=st.integers(1, 4), E=st.integers(1, 12), L=st.integers(1, 3),
       T=st.integers(1, 20), seed=st.integers(0, 10_000), data=st.data())
def test_select_properties(R, S, E, L, T, seed, data):
    if E > R * S:
        E = R * S
    g = torch.Generator().manual_seed(seed)
    load = torch.rand(L, E, generator=g) * 10
    lay = place(load, num_layers=L, num_experts=E, num_ranks=R, slots_per_rank=S)
    dead = data.draw(st.sets(st.integers(0, R - 1), max_size=R - 1))
    live = torch.tensor([r not in dead for r in range(R)])
    t = RoutingTable(lay, live)
    k = min(2, E)
    ids = torch.randint(0, E, (T, k), generator=g)
    for layer in range(L):
        sel = t.select(layer, ids)
        ok = ~sel.missing
        # Every selected slot holds the requested expert and sits on a live rank.
        assert torch.equal(lay.physical_to_logical[layer][sel.slots[ok]], ids[ok])
        assert live[t.rank_of(sel.slots[ok])].all()
        # Missing exactly where the expert has no live replica: every token is accounted for.
        live_cnt = lay.live_replica_count(live)[layer]
        assert torch.equal(sel.missing, live_cnt[ids] == 0)
        assert (sel.slots[sel.missing] == -1).all()
