"""The model's configuration: :class:`MoEConfig`, the fields of a Qwen3-MoE ``config.json``
that the model uses, read and checked from a checkpoint directory."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MoEConfig"]


@dataclass(frozen=True)
class MoEConfig:
    """The fields of a Qwen3-MoE ``config.json`` that the model uses."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be in [1, {self.num_experts}]")

    @classmethod
    def from_dict(cls, raw: Mapping) -> MoEConfig:
        """From a ``config.json`` dict (transformers 4.x or 5.x spelling)."""
        if raw.get("model_type") not in (None, "qwen3_moe"):
            raise ValueError(f"model_type ({raw.get('model_type')!r}) must be 'qwen3_moe'")
        if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
            raise ValueError(
                f"dense layers are not supported: mlp_only_layers ({raw.get('mlp_only_layers')}), "
                f"decoder_sparse_step ({raw.get('decoder_sparse_step')}) must be [] and 1"
            )
        if raw.get("use_sliding_window"):
            raise ValueError("use_sliding_window (True) is not supported")
        if raw.get("attention_bias"):
            raise ValueError("attention_bias (True) is not supported")
        if raw.get("tie_word_embeddings"):
            raise ValueError("tie_word_embeddings (True) is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act ({raw.get('hidden_act')!r}) must be 'silu'")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type ({rope_type!r}) must be 'default'")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        num_experts = raw.get("num_experts", raw.get("num_local_experts"))
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or hidden // heads,
            num_experts=num_experts,
            top_k=raw["num_experts_per_tok"],
            moe_intermediate_size=raw["moe_intermediate_size"],
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            eos_token_id=eos,
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> MoEConfig:
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))
