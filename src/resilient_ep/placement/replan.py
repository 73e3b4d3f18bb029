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


def replan(layout: ExpertLayout, dead_ranks: Iterable[int], load=None, *,
           rebalance_moves: int = 0) -> ReplanResult:
    """See the module docstring. ``rebalance_moves`` (per layer, default 0): after restoring
    coverage, also copy up to that many replicas of the hottest live rank's experts onto the
    coolest live rank (into an empty slot, or over a spare replica), each move only if it
    lowers the layer's largest live-rank load. The survivors of a failure otherwise carry the
    lost rank's load on the few replicas that were there."""
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
    S = layout.slots_per_rank
    copies_to = np.zeros(R, dtype=np.int64)  # copies planned per target rank (all layers)
    for layer in sorted({l for l, _ in uncovered}):
        row = repaired[layer]
        counts = np.bincount(row[row >= 0], minlength=E)
        lost = [e for (l, e) in uncovered if l == layer]
        # Hottest lost experts first: they matter most for throughput.
        lost.sort(key=lambda e: -arr[layer, e])
        for e in lost:
            # Among equally good slots, the rank with the fewest copies planned so far (the
            # copies then run in parallel on several ranks); never a rank holding ``e``.
            holds = np.zeros(R, dtype=bool)
            holds[np.unique(np.nonzero(row == e)[0] // S)] = True
            ok = live_slot & ~holds[np.arange(row.shape[0]) // S]
            empty = np.nonzero((row < 0) & ok)[0]
            if empty.size:
                slot = int(empty[np.argmin(copies_to[empty // S])])
                evicted = -1
            else:
                # Evict a replica of the expert that keeps the most replicas per unit of load.
                cand = np.nonzero(ok & (row >= 0))[0]
                cand = cand[counts[row[cand]] >= 2]
                if cand.size == 0:
                    unrepairable.append((layer, e))
                    continue
                score = counts[row[cand]] / np.maximum(arr[layer, row[cand]], 1e-12)
                best = cand[score >= score.max() * (1 - 1e-12)]
                slot = int(best[np.argmin(copies_to[best // S])])
                evicted = int(row[slot])
                counts[evicted] -= 1
            copies_to[slot // S] += 1
            row[slot] = e
            counts[e] += 1
            moves.append(SlotMove(layer, slot, e, evicted))
    if rebalance_moves > 0:
        live_rank = np.ones(R, dtype=bool)
        live_rank[dead] = False
        for layer in range(L):
            moves += _rebalance(repaired[layer], arr[layer], layer, layout.slots_per_rank,
                                live_rank, rebalance_moves)
    repaired_layout = ExpertLayout.from_mapping(torch.from_numpy(repaired), num_ranks=R,
                                                num_experts=E, max_replicas=k)
    return ReplanResult(now, uncovered, repaired_layout, moves, unrepairable)


def _rank_loads(row: np.ndarray, load: np.ndarray, S: int, R: int) -> np.ndarray:
    """[R] load of each rank for slot row ``row`` [P] (load split evenly over replicas)."""
    held = row >= 0
    counts = np.bincount(row[held], minlength=load.shape[0])
    per_slot = np.zeros(row.shape[0])
    per_slot[held] = load[row[held]] / counts[row[held]]
    return per_slot.reshape(R, S).sum(axis=1)


def _rebalance(row: np.ndarray, load: np.ndarray, layer: int, S: int, live: np.ndarray,
               budget: int) -> list[SlotMove]:
    """Greedy replica copies from the hottest to the coolest live rank (mutates ``row``)."""
    R = live.shape[0]
    moves: list[SlotMove] = []
    for _ in range(budget):
        rl = _rank_loads(row, load, S, R)
        live_ids = np.flatnonzero(live)
        hot = live_ids[np.argmax(rl[live_ids])]
        cold = live_ids[np.argmin(rl[live_ids])]
        current = rl[live_ids].max()
        if hot == cold:
            break
        counts = np.bincount(row[row >= 0], minlength=load.shape[0])
        cold_slots = np.arange(cold * S, (cold + 1) * S)
        cold_experts = set(row[cold_slots][row[cold_slots] >= 0].tolist())
        best = None
        for e in set(row[hot * S:(hot + 1) * S][row[hot * S:(hot + 1) * S] >= 0].tolist()):
            if e in cold_experts:
                continue
            for slot in cold_slots:
                v = int(row[slot])
                if v >= 0 and counts[v] < 2:
                    continue  # never evict an expert's last replica
                trial = row.copy()
                trial[slot] = e
                new_max = _rank_loads(trial, load, S, R)[live_ids].max()
                if best is None or new_max < best[0]:
                    best = (new_max, int(slot), int(e), v)
        if best is None or best[0] >= current * (1 - 1e-9):
            break
        _, slot, e, v = best
        row[slot] = e
        moves.append(SlotMove(layer, slot, e, v))
    return moves
