"""One active copy per expert: the routing rule of engines whose combine *sums* every rank's
partial output (vLLM's all-gather / reduce-scatter MoE: every rank sees every token and
computes the experts it serves, so each expert must be served by exactly one live rank, or a
token's expert output would be counted twice).

Given where every copy lives (an :class:`~resilient_ep.layout.ExpertLayout`, shadow slots
included), the live ranks and the shadow slots, :func:`active_slots` picks for each (layer,
expert) one physical slot: a live regular copy if there is one (the ``e mod n``-th of the
``n`` live regular copies in slot order, so that replicated experts spread over their
holders), else a live shadow (the same rule), else none (uncovered). The choice depends only
on its inputs, so every rank computes the same table without exchanging a byte.
"""

from __future__ import annotations

import torch

from .layout import ExpertLayout

__all__ = ["active_slots", "local_expert_map", "uncovered_experts"]


def active_slots(layout: ExpertLayout, live_mask: torch.Tensor,
                 shadow_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[L, E] the physical slot serving each expert, -1 where no live copy exists."""
    p2l = layout.physical_to_logical  # [L, P]
    L, E = layout.num_layers, layout.num_experts
    live = live_mask.to(torch.bool)[layout.slot_ranks()]  # [P] slot on a live rank
    shadow = (torch.zeros(layout.num_slots, dtype=torch.bool) if shadow_mask is None
              else shadow_mask.to(torch.bool))
    out = torch.full((L, E), -1, dtype=torch.int64)
    P = layout.num_slots
    experts = torch.arange(E, dtype=torch.int64).expand(L, E).contiguous()
    for tier in (False, True):
        usable = (p2l >= 0) & (live & (shadow == tier)).unsqueeze(0)  # [L, P]
        key = torch.where(usable, p2l, torch.full_like(p2l, E))  # E sorts after every expert
        ordered, slots = key.sort(dim=1, stable=True)  # each expert's copies, in slot order
        n = torch.zeros(L, E + 1, dtype=torch.int64).scatter_add_(
            1, key, torch.ones_like(key))[:, :E]  # copies in this tier
        first = torch.searchsorted(ordered, experts)  # where each expert's run starts
        pick = (first + experts % n.clamp(min=1)).clamp(max=P - 1)
        out = torch.where((out < 0) & (n > 0), slots.gather(1, pick), out)
    return out


def local_expert_map(active: torch.Tensor, rank: int, slots_per_rank: int) -> torch.Tensor:
    """[L, E] int32: for ``rank``, expert -> its local slot where ``rank`` serves it, else -1
    (vLLM's ``expert_map`` convention)."""
    lo = rank * slots_per_rank
    mine = (active >= lo) & (active < lo + slots_per_rank)
    return torch.where(mine, active - lo, torch.full_like(active, -1)).to(torch.int32)


def uncovered_experts(active: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, expert) pairs no live copy serves."""
    return [tuple(x) for x in (active < 0).nonzero().tolist()]
