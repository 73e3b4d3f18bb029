"""Expert placement: pure functions on CPU tensors.

- :func:`place`: replica counts from load, then packing into ranks' slots; fault-aware by
  default (maximise the chance every expert survives f rank failures while giving up at most
  ``max_balancedness_loss`` of balancedness against load-only placement).
- :func:`place_by_load`: the load-only baseline (what vLLM's default EPLB policy does).
- :func:`survival_probability`, :func:`expected_lost_experts`: how robust a layout is.
- :func:`replan`: a layout over the live ranks after failures that moves the fewest weights.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import ExpertLayout, LayoutError
from .packing import mirror_partner, pack_by_load, pack_fault_aware
from .replan import ReplanResult, SlotMove, replan
from .replicas import allocate_replicas, balancedness, check_load
from .survival import (SurvivalEstimate, expected_lost_experts, exposure_sets,
                       node_failure_survival, survival_probability)

__all__ = [
    "place", "place_by_load", "allocate_replicas", "balancedness", "survival_probability",
    "expected_lost_experts", "exposure_sets", "node_failure_survival", "SurvivalEstimate", "replan", "ReplanResult",
    "SlotMove", "mirror_partner",
]


def _check_sizes(num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int,
                 num_nodes: int) -> None:
    for name, v in (("layers", num_layers), ("experts", num_experts), ("ranks", num_ranks),
                    ("slots_per_rank", slots_per_rank), ("nodes", num_nodes)):
        if v < 1:
            raise LayoutError(f"{name} must be >= 1, got {v}")
    if num_experts > num_ranks * slots_per_rank:
        raise LayoutError(f"experts ({num_experts}) exceed the physical slots ranks*slots_per_rank "
                          f"= {num_ranks}*{slots_per_rank} = {num_ranks * slots_per_rank}")
    if num_ranks % num_nodes:
        raise LayoutError(f"ranks ({num_ranks}) must be a multiple of nodes ({num_nodes})")


def _distinct_rows(layout: ExpertLayout) -> torch.Tensor:
    """[L] bool: no rank holds two replicas of one expert in that layer."""
    p2l = layout.physical_to_logical
    key = torch.where(p2l >= 0, p2l * layout.num_ranks + layout.slot_ranks(), -1)  # [L, P]
    srt = key.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    return ~dup.any(dim=1)


def _rank_max(layout: ExpertLayout, load: np.ndarray) -> np.ndarray:
    return layout.rank_load(torch.from_numpy(load)).numpy().max(axis=1)


def place_by_load(load=None, *, num_layers: int, num_experts: int, num_ranks: int,
                  slots_per_rank: int, max_replicas: int | None = None) -> ExpertLayout:
    """Load-only placement (baseline): counts by load, balanced packing, no fault awareness."""
    _check_sizes(num_layers, num_experts, num_ranks, slots_per_rank, 1)
    arr = check_load(load, num_layers, num_experts)
    counts = allocate_replicas(arr, num_ranks * slots_per_rank).numpy()
    return pack_by_load(arr, counts, num_ranks, slots_per_rank, max_replicas=max_replicas)


def place(load=None, *, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int,
          num_nodes: int = 1, fault_aware: bool = True, max_balancedness_loss: float = 0.05,
          max_replicas: int | None = None) -> ExpertLayout:
    """Place ``num_experts`` logical experts (and replicas filling every slot) on
    ``num_ranks`` ranks of ``slots_per_rank`` slots, for each of ``num_layers`` layers.

    ``load [L, E]`` (or ``[E]``, or None for uniform) is the expected tokens per expert.
    """
    _check_sizes(num_layers, num_experts, num_ranks, slots_per_rank, num_nodes)
    if not 0 <= max_balancedness_loss < 1:
        raise ValueError(f"max_balancedness_loss must be in [0, 1), got {max_balancedness_loss}")
    arr = check_load(load, num_layers, num_experts)
    P = num_ranks * slots_per_rank
    counts = allocate_replicas(arr, P).numpy()
    baseline = pack_by_load(arr, counts, num_ranks, slots_per_rank)
    if not fault_aware:
        return baseline if max_replicas is None else baseline.with_max_replicas(max_replicas)
    base_max = _rank_max(baseline, arr)
    cap = base_max / (1.0 - max_balancedness_loss)
    # Candidates, most robust first; per layer the first that stays within the load budget
    # wins. A layer where none does takes the best-balanced candidate with distinct ranks
    # (only the baseline, which may stack replicas of one expert on one rank, splits load
    # finer); the baseline row stays only where distinct ranks cannot fill the slots.
    distinct = allocate_replicas(arr, P, max_replicas=num_ranks).numpy()
    candidates = []
    if P >= 2 * num_experts and num_ranks >= 2:
        # Coverage before speed: every expert gets two replicas when the budget allows.
        candidates.append((allocate_replicas(arr, P, min_replicas=2,
                                             max_replicas=num_ranks).numpy(), True))
    candidates += [(distinct, True), (distinct, False)]
    rows = baseline.physical_to_logical.clone()
    chosen = torch.zeros(num_layers, dtype=torch.bool)
    best_max = torch.full((num_layers,), float("inf"), dtype=torch.float64)
    best_rows = rows.clone()
    for cand, pairs in candidates:
        if (cand.sum(axis=1) != P).any():
            continue  # distinct ranks cannot fill every slot (more slots per rank than experts)
        # Pairs only where no expert of the layer is left with a single replica.
        layout = pack_fault_aware(arr, cand, num_ranks, slots_per_rank, num_nodes=num_nodes,
                                  mirror_pairs=pairs & (cand.min(axis=1) >= 2))
        mx = torch.from_numpy(_rank_max(layout, arr))
        mx[~_distinct_rows(layout)] = float("inf")  # greedy packing got stuck: reject the row
        ok = (mx <= torch.from_numpy(cap) * (1 + 1e-9)) & ~chosen
        rows[ok] = layout.physical_to_logical[ok]
        chosen |= ok
        better = mx < best_max
        best_rows[better] = layout.physical_to_logical[better]
        best_max = torch.minimum(best_max, mx)
        if bool(chosen.all()):
            break
    fallback = ~chosen & torch.isfinite(best_max)
    rows[fallback] = best_rows[fallback]
    return ExpertLayout.from_mapping(rows, num_ranks=num_ranks, num_experts=num_experts,
                                     max_replicas=max_replicas)
