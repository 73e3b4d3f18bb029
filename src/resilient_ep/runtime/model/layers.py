"""The model's small math, written to match transformers' Qwen3Moe op for op: RMSNorm, RoPE
tables, SwiGLU, and the ``Linear`` kernel type every projection goes through."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import MoEConfig

__all__ = ["Linear", "rms_norm", "rotate_half", "rope_tables", "swiglu"]


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``linear(x [N, in], weight [out, in]) -> [N, out]``: ``F.linear`` or a batch-invariant one."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, as ``Qwen3MoeRMSNorm``."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(var + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(cfg: MoEConfig, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_position_embeddings, D]`` (default RoPE, as ``Qwen3MoeRotaryEmbedding``)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for x ``[N, H]``, gate_up ``[2I, H]``, down ``[H, I]``."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [N, I] each
    return linear(F.silu(gate) * up, down)  # [N, H]
