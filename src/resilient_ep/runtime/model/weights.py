"""Weight containers: one expert's SwiGLU weights (:class:`ExpertWeights`) and the non-expert
weights of one decoder layer (:class:`LayerWeights`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertWeights", "LayerWeights"]


@dataclass
class ExpertWeights:
    """One expert's SwiGLU weights: ``gate_up [2I, H]`` (gate rows, then up rows), ``down [H, I]``."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.gate_up.dim() != 2 or self.down.dim() != 2 or self.gate_up.shape[0] != 2 * self.down.shape[1]:
            raise ValueError(
                f"gate_up {tuple(self.gate_up.shape)} must be [2I, H] and down {tuple(self.down.shape)} [H, I]"
            )


@dataclass
class LayerWeights:
    """Non-expert weights of one decoder layer."""

    input_norm: torch.Tensor  # [H]
    q_proj: torch.Tensor  # [NH*D, H]
    k_proj: torch.Tensor  # [KVH*D, H]
    v_proj: torch.Tensor  # [KVH*D, H]
    o_proj: torch.Tensor  # [H, NH*D]
    q_norm: torch.Tensor  # [D]
    k_norm: torch.Tensor  # [D]
    post_norm: torch.Tensor  # [H]
    router: torch.Tensor  # [E, H]
