"""Shadow activation and coverage repair under a captured CUDA graph (issue 12 items 2-3).

The MoE side is vLLM's: every rank holds its slots' weights and an ``expert_map`` (expert ->
local slot, -1 where the rank does not serve it) built by the core's ``active_slots`` /
``local_expert_map``; each rank computes the experts it serves and the partial outputs are
summed. The graph is captured once over all ranks. Then:

- a rank dies: the maps are rewritten in place and the graph, replayed, serves the dead
  rank's experts from shadows: no weight byte moves, no re-capture, output equal to the
  dense reference;
- the rank holding those shadows dies too and leaves experts uncovered: the replan's moves copy weights into
  slots in place (from a pinned host backup, as the repair's host source does), the maps are
  rewritten, and the replayed graph is exact again.
"""

import pytest
import torch

from resilient_ep.active_experts import active_slots, local_expert_map, uncovered_experts
from resilient_ep.placement import place, replan
from resilient_ep.shadow import plan_shadows

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

L, E, R, S, H, D, T, K = 2, 16, 4, 4, 4, 64, 48, 2


def _slot_weights(layout, master, dev):
    """[R] tensors [L, S+H, D, D]: each rank's slots filled with what the layout puts there."""
    per = layout.slots_per_rank
    out = []
    for r in range(R):
        w = torch.zeros(L, per, D, D, device=dev)
        for layer in range(L):
            for j in range(per):
                e = int(layout.physical_to_logical[layer, r * per + j])
                if e >= 0:
                    w[layer, j].copy_(master[layer, e])
        out.append(w)
    return out


def _write_maps(maps, layout, live, shadow_mask):
    active = active_slots(layout, live, shadow_mask)
    for r in range(R):
        m = local_expert_map(active, r, layout.slots_per_rank) if live[r] else torch.full(
            (L, E), -1, dtype=torch.int32)
        maps[r].copy_(m)  # in place: the graph reads these addresses
    return active


def _moe(x, ids, gates, weights, maps, out):
    acc = torch.zeros_like(out)
    for layer in range(L):
        y = torch.zeros(T, K, D, device=x.device)
        for w, m in zip(weights, maps):
            local = m[layer][ids].long()
            served = (local >= 0).to(x.dtype)
            sel = w[layer][local.clamp(min=0)]  # [T, K, D, D]
            y = y + torch.einsum("td,tkde->tke", x, sel) * served[..., None]
        acc = acc + (y * gates[..., None]).sum(dim=1)
    out.copy_(acc)


def _dense(x, ids, gates, master):
    acc = torch.zeros(T, D, device=x.device)
    for layer in range(L):
        y = torch.einsum("td,tkde->tke", x, master[layer][ids])
        acc = acc + (y * gates[..., None]).sum(dim=1)
    return acc


def test_shadow_flip_and_repair_replay_without_recapture():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    regular = place(num_layers=L, num_experts=E, num_ranks=R, slots_per_rank=S)
    shadows = plan_shadows(regular, H)
    layout, shadow_mask = shadows.layout, shadows.shadow_mask()
    master = torch.randn(L, E, D, D, device=dev) / D ** 0.5
    backup = master.cpu().pin_memory()  # the host backup: one copy of every expert
    weights = _slot_weights(layout, master, dev)
    maps = [torch.full((L, E), -1, dtype=torch.int32, device=dev) for _ in range(R)]
    live = torch.ones(R, dtype=torch.bool)
    active = _write_maps(maps, layout, live, shadow_mask)
    assert not bool(shadow_mask[active[active >= 0]].any()), "shadows are not routed while idle"

    x = torch.randn(T, D, device=dev)
    ids = torch.randint(0, E, (T, K), device=dev)
    gates = torch.softmax(torch.randn(T, K, device=dev), dim=-1)
    out = torch.empty(T, D, device=dev)
    ref = _dense(x, ids, gates, master)
    ptrs = [t.data_ptr() for t in weights + maps]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            _moe(x, ids, gates, weights, maps, out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _moe(x, ids, gates, weights, maps, out)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    # Rank 1 dies: its experts are served by shadows after a map rewrite; no weight moves.
    sums = [w.double().sum().item() for w in weights]
    live[1] = False
    active = _write_maps(maps, layout, live, shadow_mask)
    assert not uncovered_experts(active)
    flipped = active[active >= 0]
    assert bool(shadow_mask[flipped].any()), "some of rank 1's experts now come from shadows"
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [w.double().sum().item() for w in weights] == sums, "activation copied no weight"

    # The rank whose shadow now serves one of rank 1's experts dies too: what had copies only
    # on those two is uncovered, and the replayed graph must not give it (output differs).
    per = layout.slots_per_rank
    victim = next(int(slot) // per for slot in flipped.tolist() if shadow_mask[slot])
    live[victim] = False
    active = _write_maps(maps, layout, live, shadow_mask)
    lost = uncovered_experts(active)
    res = replan(layout, [1, victim])
    assert sorted(lost) == sorted(res.uncovered) and lost, "two deaths uncover something"
    g.replay()
    torch.cuda.synchronize()
    assert not torch.allclose(out, ref, rtol=1e-5, atol=1e-5)

    # Repair: one copy per uncovered expert from the pinned host backup into its target slot.
    for mv in res.moves:
        rank, local = divmod(mv.slot, per)
        assert live[rank]
        weights[rank][mv.layer, local].copy_(backup[mv.layer, mv.expert], non_blocking=True)
    torch.cuda.synchronize()
    active = _write_maps(maps, res.repaired_layout, live, shadow_mask)
    assert not uncovered_experts(active)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [t.data_ptr() for t in weights + maps] == ptrs, "nothing was reallocated"
