"""Probe forwards: what a replacement rank computes, and a survivor computes alike, before the
replacement may join (engine-neutral; the engines run the modules, this module supplies the
inputs, reduces the outputs and compares them).

A weight checksum says the replacement holds the same bytes as the survivors; it does not say
that its kernels compute the same thing with them (a different kernel picked at start-up, a
prepacking done differently, a thread setting that changes a reduction). A *probe* runs the
replacement's own modules, with the kernels it will serve with, on a fixed input and compares
what comes out with what a survivor's modules give for the same input.

Glossary:
- probe input: ``probe_input(name, shape, dtype)``, seeded by the module's name only, so two
  processes of any kind make the same tensor without sending it;
- fingerprint: a module output ``y [T, D]`` reduced to ``[T, FINGERPRINT_DIM + 1]`` floats:
  ``y @ P`` with ``P [D, FINGERPRINT_DIM]`` a fixed random projection (seeded by the name),
  plus each row's norm. Small enough to send for every module of a large model, and any
  change to the output moves it (a wrong weight, a wrong layout, a wrong activation);
- comparison: within ``rtol`` of the row's norm (``compare``), since two correct kernels
  agree to rounding, not always bitwise (a different thread count splits a reduction
  differently).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

__all__ = ["FINGERPRINT_DIM", "PROBE_TOKENS", "probe_input", "probe_token_ids", "fingerprint",
           "compare", "expert_key"]

FINGERPRINT_DIM = 8
PROBE_TOKENS = 4
RTOL = 1e-4


def _seed(name: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}:{name}".encode(), digest_size=8).digest(),
                          "little") & ((1 << 63) - 1)


def probe_input(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The probe input of module ``name``: standard normal values, the same in every
    process (seeded by ``name``)."""
    g = torch.Generator().manual_seed(_seed(name, "input"))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def probe_token_ids(name: str, vocab: int, tokens: int = PROBE_TOKENS,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids for an embedding's probe (``[tokens]``, int64, below ``vocab``)."""
    g = torch.Generator().manual_seed(_seed(name, "ids"))
    return torch.randint(0, max(1, int(vocab)), (tokens,), generator=g).to(device)


def fingerprint(name: str, y: torch.Tensor) -> list[list[float]]:
    """``y`` (any shape ``[..., D]``) as ``[T, FINGERPRINT_DIM + 1]`` floats (rows: the
    leading dims flattened): its projection on a fixed random basis and each row's norm."""
    y = y.detach().float().cpu().reshape(-1, y.shape[-1] if y.dim() else 1)
    d = y.shape[-1]
    g = torch.Generator().manual_seed(_seed(name, "basis"))
    basis = torch.randn((d, FINGERPRINT_DIM), generator=g) / math.sqrt(max(d, 1))
    rows = torch.cat([y @ basis, y.norm(dim=-1, keepdim=True)], dim=-1)
    return rows.tolist()


def expert_key(layer: str, expert: int) -> str:
    """The name an expert's probe goes by: its layer and its logical id."""
    return f"{layer}#expert{int(expert)}"


def compare(mine: dict[str, Any], theirs: dict[str, Any], *, rtol: float = RTOL,
            names=None) -> list[dict[str, Any]]:
    """Where two probes disagree: one entry per name (``names``: these only, default every
    name of ``mine``) whose fingerprint is missing from either side, of another shape, or
    off by more than ``rtol`` of its row's norm. Empty: the probes agree."""
    bad = []
    for name in (sorted(mine) if names is None else names):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None:
            bad.append({"name": name, "why": "missing " + ("here" if a is None else "there")})
            continue
        ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        if ta.shape != tb.shape:
            bad.append({"name": name, "why": f"shape {tuple(ta.shape)} != {tuple(tb.shape)}"})
            continue
        if ta.numel() == 0:
            continue
        scale = torch.maximum(ta[:, -1:].abs(), tb[:, -1:].abs()).clamp_min(1e-30)
        err = float(((ta - tb).abs() / scale).max())
        if not err <= rtol:  # NaN counts as a mismatch
            bad.append({"name": name, "why": f"relative error {err:.3g} > {rtol:g}"})
    return bad
