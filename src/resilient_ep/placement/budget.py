"""How many physical expert slots a rank gets, and what a budget buys.

Pure arithmetic for the engines' placement settings: ``placement.redundant_slots_per_rank``
(or vLLM's ``num_redundant_experts``, spread over the ranks) on top of the
``ceil(experts / ranks)`` slots every rank needs to hold its share.
"""

from __future__ import annotations

import math

__all__ = ["base_slots", "mirror_redundancy", "redundancy_from_total", "repairable_deaths"]


def base_slots(num_experts: int, num_ranks: int) -> int:
    """Slots per rank that hold every expert once: ``ceil(E / N)``."""
    if num_experts < 1 or num_ranks < 1:
        raise ValueError(f"experts and ranks must be >= 1, got {num_experts} and {num_ranks}")
    return math.ceil(num_experts / num_ranks)


def mirror_redundancy(num_experts: int, num_ranks: int) -> int:
    """Redundant slots per rank for the full mirror (every expert on two ranks); 0 for one rank."""
    return base_slots(num_experts, num_ranks) if num_ranks > 1 else 0


def redundancy_from_total(num_redundant_experts: int, num_ranks: int) -> int:
    """vLLM's ``num_redundant_experts`` (physical experts beyond the logical ones, in the whole
    instance) as redundant slots per rank: the total spread evenly, rounded up."""
    if num_redundant_experts < 0:
        raise ValueError(f"num_redundant_experts must be >= 0, got {num_redundant_experts}")
    return math.ceil(num_redundant_experts / num_ranks)


def repairable_deaths(num_experts: int, num_ranks: int, slots_per_rank: int) -> int:
    """How many rank deaths the instance can lose and still hold every expert after repair
    (the survivors' slots fit all experts): the largest ``d < N`` with ``S * (N - d) >= E``."""
    d = 0
    while d + 1 < num_ranks and slots_per_rank * (num_ranks - d - 1) >= num_experts:
        d += 1
    return d
