"""How many replicas each logical expert gets, and how balanced a layout is.

``load [L, E]`` is the expected number of tokens routed to each logical expert per step (any
non-negative scale). ``counts [L, E]`` is the number of physical slots (replicas) per expert.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import ExpertLayout

__all__ = ["allocate_replicas", "balancedness", "check_load"]


def check_load(load, num_layers: int, num_experts: int) -> np.ndarray:
    """``load`` as float64 ``[L, E]``; None means uniform. Clear errors for bad input."""
    if load is None:
        return np.ones((num_layers, num_experts))
    arr = np.asarray(load.cpu() if isinstance(load, torch.Tensor) else load, dtype=np.float64)
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (num_layers, arr.shape[0])).copy()
    if arr.shape != (num_layers, num_experts):
        raise ValueError(f"load must have shape [layers, experts] = [{num_layers}, {num_experts}] "
                         f"(or [experts]), got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        raise ValueError("load must be finite and >= 0")
    # An all-zero row carries no information: treat as uniform.
    zero = arr.sum(axis=1) == 0
    arr[zero] = 1.0
    return arr


def allocate_replicas(load, num_slots: int, *, min_replicas: int = 1,
                      max_replicas: int | None = None) -> torch.Tensor:
    """Replica counts ``[L, E]`` summing to ``num_slots`` per layer.

    Every expert gets ``min_replicas``; each remaining slot goes to the expert whose load per
    replica is highest (this minimises the largest per-replica load, as vLLM's EPLB does).
    ``max_replicas`` caps an expert's count (e.g. at the rank count, so replicas can sit on
    distinct ranks); slots left when every expert is capped stay unassigned.
    """
    arr = np.asarray(load, dtype=np.float64)
    L, E = arr.shape
    if num_slots < E * min_replicas:
        raise ValueError(f"num_slots ({num_slots}) < experts ({E}) * min_replicas ({min_replicas})")
    counts = np.full((L, E), min_replicas, dtype=np.int64)
    rows = np.arange(L)
    # Tiny tie-break so equal loads spread deterministically over expert ids.
    tie = np.arange(E)[None, :] * 1e-12
    cap = np.inf if max_replicas is None else max_replicas
    for _ in range(num_slots - E * min_replicas):
        score = np.where(counts < cap, arr / counts - tie, -np.inf)
        idx = np.argmax(score, axis=1)
        grow = np.isfinite(score[rows, idx])
        counts[rows[grow], idx[grow]] += 1
    return torch.from_numpy(counts)


def balancedness(layout: ExpertLayout, load=None, live_ranks=None) -> float:
    """Mean over layers of (mean rank load / max rank load); 1.0 is perfect balance.

    ``live_ranks`` (rank ids or a bool mask ``[R]``) restricts the mean and max to those ranks,
    e.g. the survivors of a layout returned by ``replan`` (dead ranks hold nothing).
    """
    arr = check_load(load, layout.num_layers, layout.num_experts)
    rank_load = layout.rank_load(torch.from_numpy(arr)).numpy()  # [L, R]
    if live_ranks is not None:
        mask = np.zeros(layout.num_ranks, dtype=bool)
        sel = np.asarray(live_ranks.cpu() if isinstance(live_ranks, torch.Tensor) else list(live_ranks))
        if sel.dtype == bool:
            mask[:] = sel
        else:
            mask[sel.astype(np.int64)] = True
        rank_load = rank_load[:, mask]
    return float(np.mean(rank_load.mean(axis=1) / np.maximum(rank_load.max(axis=1), 1e-12)))
