"""A captured CUDA graph routes by the new layout after an in-place table patch (no re-capture)."""

import pytest
import torch

from resilient_ep.membership import Membership
from resilient_ep.placement import place, replan
from resilient_ep.routing import RoutingTable

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _route(table: RoutingTable, ids: torch.Tensor, slot_value: torch.Tensor, out: torch.Tensor):
    sel = table.select(0, ids)
    # Stand-in for the expert side: each slot's "weight" is a value; missing choices give -1.
    vals = torch.where(sel.missing, torch.full_like(sel.slots, -1, dtype=slot_value.dtype),
                       slot_value[sel.slots.clamp(min=0)])
    out.copy_(vals)


def test_graph_replay_sees_patched_table():
    dev = torch.device("cuda")
    E, R, S = 16, 4, 6
    lay = place(num_layers=2, num_experts=E, num_ranks=R, slots_per_rank=S, max_replicas=4)
    table = RoutingTable(lay, device=dev)
    ptrs = table.storage_ptrs()
    ids = torch.randint(0, E, (64, 2), device=dev)
    slot_value = torch.arange(R * S, device=dev, dtype=torch.float32)
    out = torch.empty(64, 2, device=dev)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            _route(table, ids, slot_value, out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _route(table, ids, slot_value, out)

    def eager():
        ref = torch.empty_like(out)
        _route(table, ids, slot_value, ref)
        return ref

    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager())
    before = out.clone()

    # A rank dies: mask it in place, replay, and the graph routes around it.
    m = Membership(R, device=dev)
    m.fail([1])
    table.update(live_mask=m.live_mask.cpu(), epoch=m.epoch)
    g.replay()
    torch.cuda.synchronize()
    after = out.clone()
    assert torch.equal(after, eager())
    dead_slots = set(range(1 * S, 2 * S))
    assert not (set(after[after >= 0].long().tolist()) & dead_slots)
    assert not torch.equal(before, after)

    # Repair: a new layout written in place, graph still valid.
    res = replan(lay, [1])
    table.update(res.repaired_layout, m.live_mask.cpu(), epoch=m.epoch)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager())
    assert (out >= 0).all(), "after repair every expert is covered"
    assert table.storage_ptrs() == ptrs
