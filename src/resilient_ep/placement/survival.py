"""Probability that every logical expert keeps a live replica after f random rank failures.

An expert whose replicas sit on rank set A is lost exactly when every rank of A fails. Only the
*minimal* such sets matter (a superset of a losing set loses too), so the layout is reduced to
its distinct minimal exposure sets of size <= f before counting.

Exact: enumerate all C(R, f) failure sets when that is cheap. Otherwise Monte Carlo over
uniformly random f-subsets, with a Wilson 95 % confidence interval.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..layout import ExpertLayout

__all__ = ["SurvivalEstimate", "survival_probability", "exposure_sets", "expected_lost_experts"]

EXACT_LIMIT = 300_000
"""Enumerate failure sets exactly while C(R, f) is at most this."""


@dataclass(frozen=True)
class SurvivalEstimate:
    p: float
    """Probability that every (layer, expert) keeps a live replica."""
    low: float
    """Lower end of the 95 % interval (equal to ``p`` when exact)."""
    high: float
    """Upper end of the 95 % interval (equal to ``p`` when exact)."""
    exact: bool
    """True when computed by enumeration."""
    samples: int = 0
    """Failure sets evaluated (C(R, f) when exact)."""


def exposure_sets(layout: ExpertLayout, max_size: int | None = None) -> list[frozenset[int]]:
    """Distinct minimal rank sets whose joint failure loses some expert, smallest first."""
    sets: set[frozenset[int]] = set()
    S = layout.slots_per_rank
    l2p = layout.logical_to_physical.numpy()
    cnt = layout.replica_count.numpy()
    for l in range(layout.num_layers):
        for e in range(layout.num_experts):
            n = int(cnt[l, e])
            if n == 0:
                sets.add(frozenset())  # already uncovered: lost under any failure set
                continue
            ranks = frozenset((l2p[l, e, :n] // S).tolist())
            if max_size is None or len(ranks) <= max_size:
                sets.add(ranks)
    minimal: list[frozenset[int]] = []
    for s in sorted(sets, key=len):
        if not any(m <= s for m in minimal):
            minimal.append(s)
    return minimal


def _wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def survival_probability(layout: ExpertLayout, failures: int, *, num_nodes: int = 1,
                         samples: int = 20_000, seed: int = 0) -> SurvivalEstimate:
    """P(every expert keeps a live replica) after ``failures`` uniformly random rank failures.

    ``num_nodes`` is accepted for symmetry with placement; failures are of single ranks.
    """
    R = layout.num_ranks
    if not 0 <= failures < R:
        raise ValueError(f"failures must be in [0, {R}) for {R} ranks, got {failures}")
    sets = exposure_sets(layout, max_size=failures)
    if frozenset() in sets:
        return SurvivalEstimate(0.0, 0.0, 0.0, True, 0)
    if failures == 0 or not sets:
        return SurvivalEstimate(1.0, 1.0, 1.0, True, 0)
    total = math.comb(R, failures)
    if total <= EXACT_LIMIT:
        fail_sets = np.array(list(itertools.combinations(range(R), failures)), dtype=np.int64)
        lost = _lost(fail_sets, sets, R)
        p = 1.0 - lost.mean()
        return SurvivalEstimate(float(p), float(p), float(p), True, total)
    rng = np.random.default_rng(seed)
    fail_sets = np.argsort(rng.random((samples, R)), axis=1)[:, :failures]
    lost = _lost(fail_sets, sets, R)
    ok = int((~lost).sum())
    low, high = _wilson(ok, samples)
    return SurvivalEstimate(ok / samples, low, high, False, samples)


def _lost(fail_sets: np.ndarray, sets: list[frozenset[int]], R: int) -> np.ndarray:
    """[N] bool: failure set n contains some exposure set."""
    n = fail_sets.shape[0]
    failed = np.zeros((n, R), dtype=bool)
    np.put_along_axis(failed, fail_sets, True, axis=1)
    lost = np.zeros(n, dtype=bool)
    by_size: dict[int, list[list[int]]] = {}
    for s in sets:
        by_size.setdefault(len(s), []).append(sorted(s))
    chunk = 4096
    for size, members in by_size.items():
        idx = np.array(members, dtype=np.int64)  # [M, size]
        for start in range(0, n, chunk):
            f = failed[start:start + chunk]       # [n', R]
            hit = f[:, idx].all(axis=2).any(axis=1)  # [n', M, size] -> [n']
            lost[start:start + chunk] |= hit
    return lost


def expected_lost_experts(layout: ExpertLayout, failures: int) -> float:
    """Expected number of (layer, expert) pairs without a live replica after ``failures``
    uniformly random rank failures (exact: hypergeometric per expert)."""
    R = layout.num_ranks
    S = layout.slots_per_rank
    cnt = layout.replica_count.numpy()
    l2p = layout.logical_to_physical.numpy()
    total = 0.0
    denom = math.comb(R, failures)
    for l in range(layout.num_layers):
        for e in range(layout.num_experts):
            n = int(cnt[l, e])
            k = len(set((l2p[l, e, :n] // S).tolist())) if n else 0
            if k <= failures:
                total += math.comb(R - k, failures - k) / denom
    return total


def node_failure_survival(layout: ExpertLayout, num_nodes: int) -> float:
    """Fraction of nodes whose loss (all ``R / num_nodes`` ranks at once, ranks node-major)
    leaves every expert with a live replica."""
    R = layout.num_ranks
    if num_nodes < 1 or R % num_nodes:
        raise ValueError(f"ranks ({R}) must be a multiple of nodes ({num_nodes})")
    per = R // num_nodes
    sets = exposure_sets(layout, max_size=per)
    ok = 0
    for n in range(num_nodes):
        ranks = set(range(n * per, (n + 1) * per))
        ok += not any(s <= ranks for s in sets)
    return ok / num_nodes
