"""Replanning after rank failures: keep what survived, move the fewest weights.

``replan`` returns two layouts over the same table shape:
- ``layout``: usable at once, no weights move. Dead ranks' slots are emptied; experts that
  kept a replica are served by it; experts that lost every replica are ``uncovered``.
- ``repaired_layout``: coverage restored. Each uncovered expert takes one slot on a live rank
  (an empty slot, else a replica of the expert with the most live replicas per unit of load),
  which costs exactly one weight copy per uncovered expert (``moves``) from the cheapest
  repair source. No other weight moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from ..layout import ExpertLayout
from .replicas import check_load

__all__ = ["SlotMove", "ReplanResult", "replan"]


@dataclass(frozen=True)
class SlotMove:
    """Load logical ``expert`` of ``layer`` into physical ``slot`` (replacing ``evicted``)."""

    layer: int
    slot: int
    expert: int
    evicted: int = -1


@dataclass(frozen=True)
class ReplanResult:
    layout: ExpertLayout
    """Immediate layout: dead ranks' slots emptied, nothing moved."""
    uncovered: list[tuple[int, int]]
    """(layer, expert) that lost every replica."""
    repaired_layout: ExpertLayout
    """Layout after ``moves`` are applied: every expert covered when room allows."""
    moves: list[SlotMove] = field(default_factory=list)
    """One weight copy per uncovered expert that could be given a slot."""
    unrepairable: list[tuple[int, int]] = field(default_factory=list)
    """(layer, expert) for which no live slot could be freed (more lost experts than slots)."""

    @property
    def moved_experts(self) -> int:
        return len(self.moves)


def replan(layout: ExpertLayout, dead_ranks: Iterable[int], load=None) -> ReplanResult:
    R, L, E = layout.num_ranks, layout.num_layers, layout.num_experts
    dead = sorted({int(r) for r in dead_ranks})
    for r in dead:
        if not 0 <= r < R:
            raise ValueError(f"dead rank {r} out of range [0, {R})")
    if len(dead) >= R:
        raise ValueError(f"all {R} ranks are dead: nothing to replan onto")
    arr = check_load(load, L, E)
    p2l = layout.physical_to_logical.clone()
    slot_rank = layout.slot_ranks()
    dead_slots = torch.zeros(layout.num_slots, dtype=torch.bool)
    for r in dead:
        dead_slots[slot_rank == r] = True
    p2l[:, dead_slots] = -1
    k = layout.max_replicas
    now = ExpertLayout.from_mapping(p2l, num_ranks=R, num_experts=E, max_replicas=k)
    uncovered = [tuple(x) for x in (now.replica_count == 0).nonzero().tolist()]

    repaired = p2l.clone().numpy()
    moves: list[SlotMove] = []
    unrepairable: list[tuple[int, int]] = []
    live_slot = ~dead_slots.numpy()
    for layer in sorted({l for l, _ in uncovered}):
        row = repaired[layer]
        counts = np.bincount(row[row >= 0], minlength=E)
        lost = [e for (l, e) in uncovered if l == layer]
        # Hottest lost experts first: they matter most for throughput.
        lost.sort(key=lambda e: -arr[layer, e])
        for e in lost:
            empty = np.nonzero((row < 0) & live_slot)[0]
            if empty.size:
                slot, evicted = int(empty[0]), -1
            else:
                # Evict a replica of the expert that keeps the most replicas per unit of load.
                cand = np.nonzero(live_slot & (row >= 0))[0]
                cand = cand[counts[row[cand]] >= 2]
                if cand.size == 0:
                    unrepairable.append((layer, e))
                    continue
                score = counts[row[cand]] / np.maximum(arr[layer, row[cand]], 1e-12)
                slot = int(cand[np.argmax(score)])
                evicted = int(row[slot])
                counts[evicted] -= 1
            row[slot] = e
            counts[e] += 1
            moves.append(SlotMove(layer, slot, e, evicted))
    repaired_layout = ExpertLayout.from_mapping(torch.from_numpy(repaired), num_ranks=R,
                                                num_experts=E, max_replicas=k)
    return ReplanResult(now, uncovered, repaired_layout, moves, unrepairable)
