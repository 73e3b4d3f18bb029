"""Where every copy of every expert lives, by budget: one plan the same in every process of an
instance (the engine adapters place their expert slots by it).

:class:`ExpertPlan`: ``ceil(E / N) + placement.redundant_slots_per_rank`` regular slots per
rank (None: the full mirror, every expert on two ranks), filled by the core's survival-aware
:func:`~resilient_ep.placement.place`, plus ``shadow`` slots chosen by
:func:`~resilient_ep.shadow.plan_shadows`. One row: every MoE layer of a model is placed
alike. Pure: no engine, no I/O.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ResilienceConfig
from .layout import ExpertLayout, LayoutError
from .placement import place
from .placement.budget import base_slots, mirror_redundancy, repairable_deaths
from .shadow import ShadowLayout, plan_shadows

__all__ = ["ExpertPlan", "regular_slots"]


def regular_slots(num_experts: int, num_ranks: int, config: ResilienceConfig) -> tuple[int, int]:
    """(redundant, regular) slots per rank for ``placement.redundant_slots_per_rank`` (None:
    the full mirror). A rank holds an expert at most once: never more slots than experts."""
    redundant = config.placement.redundant_slots_per_rank
    if redundant is None:
        redundant = mirror_redundancy(num_experts, num_ranks)
    return int(redundant), min(base_slots(num_experts, num_ranks) + int(redundant), num_experts)


class ExpertPlan:
    """Where every copy of every expert lives (one row: all MoE layers of a model are placed
    alike), the same in every process of an instance."""

    def __init__(self, num_experts: int, num_ranks: int, config: ResilienceConfig | None = None,
                 *, shadow_slots: int = 0):
        cfg = config or ResilienceConfig()
        if num_ranks < 1 or num_experts < 1:
            raise LayoutError(f"experts ({num_experts}) and EP ranks ({num_ranks}) must be >= 1")
        self.E, self.N = num_experts, num_ranks
        self.redundant, self.regular = regular_slots(num_experts, num_ranks, cfg)
        self.shadow_slots = max(0, min(int(shadow_slots), num_experts - self.regular))
        pc = cfg.placement
        nodes = max(1, num_ranks // pc.ranks_per_node)
        if cfg.transport.node_addresses:  # across nodes: the real ones (EP ranks node-major)
            nodes = len(cfg.transport.node_addresses)
        if num_ranks % nodes:
            nodes = 1
        regular = place(num_layers=1, num_experts=num_experts, num_ranks=num_ranks,
                        slots_per_rank=self.regular, num_nodes=nodes, fault_aware=pc.fault_aware,
                        max_balancedness_loss=pc.max_balancedness_loss)
        self.shadows: ShadowLayout = plan_shadows(regular, self.shadow_slots)
        self.layout: ExpertLayout = self.shadows.layout
        self.slots_per_rank = self.regular + self.shadow_slots
        for r in range(num_ranks):
            held = self.layout.experts_on_rank(0, r)
            if len(set(held)) != len(held):
                raise LayoutError(f"placement put two copies of one expert on rank {r}: {held}")

    def held_map(self, rank: int) -> torch.Tensor:
        """What ``rank`` holds, as vLLM's ``expert_map``: global expert -> local slot (-1)."""
        m = torch.full((self.E,), -1, dtype=torch.int32)
        S = self.slots_per_rank
        for i, e in enumerate(self.layout.physical_to_logical[0, rank * S:(rank + 1) * S].tolist()):
            if e >= 0:
                m[e] = i
        return m

    def describe(self) -> dict[str, Any]:
        return {"experts": self.E, "ranks": self.N, "regular_slots_per_rank": self.regular,
                "redundant_slots_per_rank": self.redundant,
                "shadow_slots_per_rank": self.shadow_slots,
                "repairable_deaths": repairable_deaths(self.E, self.N, self.slots_per_rank),
                "replicas": self.layout.replica_count[0].tolist()}
