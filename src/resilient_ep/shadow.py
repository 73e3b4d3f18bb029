"""Shadow experts: extra copies of experts in residual memory, routed only when needed.

A rank's shadow slots come after its regular slots (``ShadowLayout``): rank ``r`` holds
regular slots ``[r*S', r*S' + S)`` and shadow slots ``[r*S' + S, (r+1)*S')`` with
``S' = S + H``. Every copy, shadow or not, is a slot of one :class:`~resilient_ep.layout.
ExpertLayout`, so coverage, replanning and repair see shadows as the replicas they are;
routing prefers a live regular copy and takes a shadow into the tables only when the expert
has none left (a table flip: the weights are already there).

Which experts get shadows (:func:`plan_shadows`): the ones whose loss is likeliest, then
costliest, greedily. An expert with copies on ``c`` ranks is lost when all ``c`` fail (about
``p^c`` for a per-rank failure probability ``p``), and a shadow on a rank not holding it
makes that ``p^(c+1)``: the fewer copies, the more survival a shadow buys, and every expert
costs the same bytes. So each step gives the next free shadow slot (ranks in turn) to the
expert with the fewest copies that its rank does not hold yet, the most loaded among equals
(coverage before speed: no expert gets a third copy while another has one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layout import ExpertLayout, LayoutError
from .placement.replicas import check_load

__all__ = ["ShadowLayout", "plan_shadows", "shadow_slots_for_memory", "residual_bytes"]


@dataclass(frozen=True)
class ShadowLayout:
    layout: ExpertLayout
    """Every copy: ``slots_per_rank = regular + shadow`` per rank."""
    regular_slots: int
    shadow_slots: int

    def is_shadow_slot(self, slot: int) -> bool:
        return slot % (self.regular_slots + self.shadow_slots) >= self.regular_slots

    def shadow_mask(self) -> torch.Tensor:
        """[P] bool: which physical slots are shadow slots."""
        per = self.regular_slots + self.shadow_slots
        return (torch.arange(self.layout.num_slots) % per) >= self.regular_slots

    def shadows_on_rank(self, layer: int, rank: int) -> list[int]:
        per = self.regular_slots + self.shadow_slots
        start = rank * per + self.regular_slots
        row = self.layout.physical_to_logical[layer, start:start + self.shadow_slots]
        return [int(e) for e in row.tolist() if e >= 0]


def residual_bytes() -> float:
    """Memory beyond what the engine takes, for this machine: on CUDA the free device memory
    of the current device, on a CPU the memory the machine has available."""
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def shadow_slots_for_memory(residual_bytes: float, memory_fraction: float,
                            bytes_per_expert: int, *, max_slots: int = 0,
                            free_experts: int | None = None) -> int:
    """Shadow slots a rank can afford: ``memory_fraction`` of its residual memory over the
    bytes one expert takes in every MoE layer; capped by ``max_slots`` (0: no cap) and by
    ``free_experts`` (the experts the rank does not hold: more shadows would repeat one)."""
    if bytes_per_expert <= 0:
        raise ValueError(f"bytes_per_expert must be > 0, got {bytes_per_expert}")
    n = int(max(0.0, residual_bytes) * memory_fraction // bytes_per_expert)
    if max_slots:
        n = min(n, max_slots)
    if free_experts is not None:
        n = min(n, max(0, free_experts))
    return n


def plan_shadows(regular: ExpertLayout, shadow_slots: int, load=None) -> ShadowLayout:
    """``regular`` with ``shadow_slots`` shadow slots appended to every rank, filled as the
    module docstring says (per layer; ``load`` [L, E] or [E] or None for uniform)."""
    if shadow_slots < 0:
        raise LayoutError(f"shadow_slots must be >= 0, got {shadow_slots}")
    R, S, L, E = regular.num_ranks, regular.slots_per_rank, regular.num_layers, regular.num_experts
    arr = check_load(load, L, E)
    per = S + shadow_slots
    rows = np.full((L, R * per), -1, dtype=np.int64)
    base = regular.physical_to_logical.numpy()
    for r in range(R):
        rows[:, r * per:r * per + S] = base[:, r * S:(r + 1) * S]
    for layer in range(L):
        held = [set(int(e) for e in base[layer, r * S:(r + 1) * S] if e >= 0) for r in range(R)]
        copies = np.zeros(E, dtype=np.int64)
        for r in range(R):
            for e in held[r]:
                copies[e] += 1
        weight = arr[layer] + 1e-9
        for j in range(shadow_slots):
            for r in range(R):
                cand = [e for e in range(E) if e not in held[r]]
                if not cand:
                    continue
                e = max(cand, key=lambda x: (-copies[x], weight[x], -x))
                rows[layer, r * per + S + j] = e
                held[r].add(e)
                copies[e] += 1
    layout = ExpertLayout.from_mapping(torch.from_numpy(rows), num_ranks=R, num_experts=E)
    return ShadowLayout(layout, S, shadow_slots)
