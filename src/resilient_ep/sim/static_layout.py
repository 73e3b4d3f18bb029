"""The baselines' expert layout: static round-robin slots, as a fixed-membership EP engine
lays experts out (no fault awareness; ``resilient_ep`` uses the core's placement instead).

``slots[r, j]`` is the logical expert in slot ``j`` of rank ``r``: slot ``r * S + j`` of the
flattened ``[R, S]`` table holds expert ``(r * S + j) % E``, so the ``R * S - E`` redundant
slots replicate experts 0, 1, ... in order. Every MoE layer has the same table.

Example (E=4, R=3, S=2)::

    slots = [[0, 1],    # rank 0
             [2, 3],    # rank 1
             [0, 1]]    # rank 2: replicas of experts 0 and 1
"""

from __future__ import annotations

import numpy as np

__all__ = ["round_robin", "uncovered_experts"]


def round_robin(num_experts: int, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """``int64[R, S]`` table of logical experts; needs ``R * S >= E``."""
    if num_ranks * slots_per_rank < num_experts:
        raise ValueError(f"{num_ranks} ranks x {slots_per_rank} slots cannot hold "
                         f"{num_experts} experts")
    return (np.arange(num_ranks * slots_per_rank) % num_experts).reshape(num_ranks,
                                                                          slots_per_rank)


def uncovered_experts(slots: np.ndarray, alive: np.ndarray, num_experts: int) -> int:
    """Experts (per layer) with no replica on a live rank."""
    covered = np.zeros(num_experts, dtype=bool)
    covered[slots[alive].ravel()] = True
    return int(num_experts - covered.sum())
