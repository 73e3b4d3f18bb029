"""Batch-invariant kernels: a row's result does not depend on the other rows in its batch.

A CPU GEMM picks its blocking from the matrix shape, so the same row multiplied inside a batch
of 5 and of 17 rows can round differently (measured here: 50 of 55 shape/size combinations
differed). The reference runtime moves requests between ranks and recomputes them, and expert
owners batch tokens from whichever ranks sent them: to give outputs bit-identical to a run
without failures, every matmul runs on fixed-size row blocks (``BLOCK`` rows, zero-padded),
so each row always meets the same kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BLOCK", "linear"]

BLOCK = 16
"""Rows per GEMM call. Any fixed value works; 16 measured fastest of 1/4/8/16/32 here."""


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for x ``[N, in]`` computed in fixed blocks of ``BLOCK`` rows."""
    n = x.shape[0]
    if n == BLOCK:
        return F.linear(x, weight)
    pad = (-n) % BLOCK
    xp = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    out = torch.empty(n + pad, weight.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, n + pad, BLOCK):
        out[i:i + BLOCK] = F.linear(xp[i:i + BLOCK], weight)
    return out[:n]
