"""Plain-torch dispatch/combine in one process: the oracle for every transport.

``reference_moe`` computes what an expert-parallel MoE layer must return: for each token,
the sum over its top-k choices, in choice order, of ``weight * expert(x)``. Any EP path (ZeroMQ
here, DeepEP on GPU) must match it; with batch-invariant experts, bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["reference_moe", "combine"]


def combine(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum in choice order: y ``[T, k, H]``, weights ``[T, k]`` -> ``[T, H]``."""
    out = torch.zeros(y.shape[0], y.shape[2], dtype=y.dtype)
    for j in range(y.shape[1]):
        out += topk_weights[:, j:j + 1].to(y.dtype) * y[:, j]
    return out


def reference_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x ``[T, H]``, topk_ids/weights ``[T, k]``; ``expert(e, rows [n, H]) -> [n, H]``."""
    T, k = topk_ids.shape
    y = torch.zeros(T, k, x.shape[1], dtype=x.dtype)
    for e in topk_ids.unique().tolist():
        t, j = (topk_ids == e).nonzero(as_tuple=True)
        y[t, j] = expert(int(e), x[t])
    return combine(y, topk_weights)
