"""The model: :class:`MoEModel`, Qwen3-MoE's embeddings, attention, router, final norm and head
(experts in an :class:`~resilient_ep.runtime.model.ExpertBank`), as the pieces a runtime drives
one step with, plus single-process conveniences (``forward_step``, ``generate_greedy``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..kv_cache import PagedKVCache
from .attention import AttentionBatch, attend_batched, attend_per_row
from .checkpoint import CheckpointReader
from .config import MoEConfig
from .experts import ExpertBank
from .layers import Linear, rms_norm, rope_tables, rotate_half
from .weights import LayerWeights

__all__ = ["MoEModel"]


class MoEModel:
    """Qwen3-MoE: embeddings, attention, router, final norm and head; experts in an ``ExpertBank``.

    ``experts`` is the bank of all experts (single-process use) or ``None`` (an attention worker
    of an EP runtime, whose experts live in per-rank banks).

    Kernels (plain attributes, set them after ``load``):
    - ``linear``: the matmul of every projection (default ``F.linear``; ``load(linear=...)`` also
      sets it on the model's own bank).
    - ``attention_mode``: ``"batched"`` (default: all decode requests of a step in one padded
      attention call) or ``"per_row"`` (each new token attends in its own call over exactly its
      keys ``0 .. position``). With ``per_row`` and a batch-invariant ``linear``, a token's
      output bits do not depend on the batch it is in, on prefill chunking, or on whether it is
      decoded or recomputed as part of a prefill chunk; ``batched`` is faster (about 2x at 64
      decode requests on one core) but its rounding depends on the longest request in the step.
    """

    ATTENTION_MODES = ("batched", "per_row")

    def __init__(
        self,
        config: MoEConfig,
        embed_tokens: torch.Tensor,
        layers: list[LayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        experts: ExpertBank | None,
    ) -> None:
        self.config = config
        self.embed_tokens = embed_tokens  # [V, H]
        self.layers = layers
        self.final_norm = final_norm  # [H]
        self.lm_head = lm_head  # [V, H]
        self.experts = experts
        self.dtype = embed_tokens.dtype
        self.device = embed_tokens.device
        self.cos, self.sin = rope_tables(config, self.dtype, self.device)  # [P, D] each
        self.linear: Linear = F.linear
        self.attention_mode = "batched"

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        experts: bool | Mapping[int, Sequence[int]] = True,
        linear: Linear | None = None,
        attention_mode: str = "batched",
    ) -> MoEModel:
        """Load a checkpoint directory.

        ``experts=True`` loads every expert (slot s holds expert s), ``False`` none, a mapping
        ``layer → [logical expert per slot]`` only those (see ``ExpertBank.load``).
        ``linear`` and ``attention_mode``: see the class doc.
        """
        if attention_mode not in cls.ATTENTION_MODES:
            raise ValueError(f"attention_mode ({attention_mode!r}) must be one of {cls.ATTENTION_MODES}")
        cfg = MoEConfig.from_dir(path)

        def get(ckpt: CheckpointReader, key: str) -> torch.Tensor:
            return ckpt.get(key).to(dtype=dtype, device=device)

        with CheckpointReader(path) as ckpt:
            layers = []
            for l in range(cfg.num_layers):
                p = f"model.layers.{l}."
                layers.append(
                    LayerWeights(
                        input_norm=get(ckpt, p + "input_layernorm.weight"),
                        q_proj=get(ckpt, p + "self_attn.q_proj.weight"),
                        k_proj=get(ckpt, p + "self_attn.k_proj.weight"),
                        v_proj=get(ckpt, p + "self_attn.v_proj.weight"),
                        o_proj=get(ckpt, p + "self_attn.o_proj.weight"),
                        q_norm=get(ckpt, p + "self_attn.q_norm.weight"),
                        k_norm=get(ckpt, p + "self_attn.k_norm.weight"),
                        post_norm=get(ckpt, p + "post_attention_layernorm.weight"),
                        router=get(ckpt, p + "mlp.gate.weight"),
                    )
                )
            embed = get(ckpt, "model.embed_tokens.weight")
            norm = get(ckpt, "model.norm.weight")
            head = get(ckpt, "lm_head.weight")
        bank = None
        if experts is True:
            experts = {l: list(range(cfg.num_experts)) for l in range(cfg.num_layers)}
        if experts:
            bank = ExpertBank.load(path, experts, dtype=dtype, device=device)
        model = cls(cfg, embed, layers, norm, head, bank)
        model.attention_mode = attention_mode
        if linear is not None:
            model.linear = linear
            if bank is not None:
                bank.linear = linear
        return model

    # ---- the pieces a runtime drives -----------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids ``[T]`` int64 → ``[T, H]``."""
        return F.embedding(token_ids.to(self.device), self.embed_tokens)

    def attention(self, layer: int, h: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache) -> torch.Tensor:
        """Pre-norm self-attention over the paged cache, residual included: h ``[T, H]`` → ``[T, H]``.

        Writes this step's K/V of ``layer`` into ``kv`` at ``batch.slots``, then each request
        attends causally to its cached tokens plus its new ones.
        """
        cfg, w = self.config, self.layers[layer]
        t = h.shape[0]
        if t != batch.num_tokens:
            raise ValueError(f"h has {t} tokens, batch has {batch.num_tokens}")
        if t and int(batch.positions.max()) >= cfg.max_position_embeddings:
            raise ValueError(
                f"position {int(batch.positions.max())} >= max_position_embeddings ({cfg.max_position_embeddings})"
            )
        x = rms_norm(h, w.input_norm, cfg.rms_norm_eps)
        q = rms_norm(self.linear(x, w.q_proj).view(t, cfg.num_heads, cfg.head_dim), w.q_norm, cfg.rms_norm_eps)
        k = rms_norm(self.linear(x, w.k_proj).view(t, cfg.num_kv_heads, cfg.head_dim), w.k_norm, cfg.rms_norm_eps)
        v = self.linear(x, w.v_proj).view(t, cfg.num_kv_heads, cfg.head_dim)
        pos = batch.positions.to(self.device)
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # [T, 1, D]
        q = q * cos + rotate_half(q) * sin  # [T, NH, D]
        k = k * cos + rotate_half(k) * sin  # [T, KVH, D]
        kv.write(layer, batch.slots.to(kv.kv.device), k, v)

        out = torch.empty(t, cfg.num_heads, cfg.head_dim, dtype=h.dtype, device=h.device)  # [T, NH, D]
        if self.attention_mode == "batched":
            attend_batched(layer, q, batch, kv, out, cfg.head_dim**-0.5)
        elif self.attention_mode == "per_row":
            attend_per_row(layer, q, batch, kv, out, cfg.head_dim**-0.5)
        else:
            raise ValueError(f"attention_mode ({self.attention_mode!r}) must be one of {self.ATTENTION_MODES}")
        return h + self.linear(out.reshape(t, cfg.num_heads * cfg.head_dim), w.o_proj)

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-attention norm and router: h ``[T, H]`` → x ``[T, H]``, topk_ids ``[T, k]`` int64
        (logical experts), topk_weights ``[T, k]`` fp32 (softmax, top-k, renormalised if norm_topk_prob)."""
        cfg, w = self.config, self.layers[layer]
        x = rms_norm(h, w.post_norm, cfg.rms_norm_eps)
        logits = self.linear(x, w.router)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = torch.topk(probs, cfg.top_k, dim=-1)  # [T, k]
        if cfg.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return x, topk_ids, topk_weights

    def moe_local(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, order: str = "expert"
    ) -> torch.Tensor:
        """MoE output ``[T, H]`` with this process's bank (all experts needed must be in it).

        ``order``: summation order of the k contributions, see ``ExpertBank.moe``.
        """
        if self.experts is None:
            raise RuntimeError("moe_local needs experts: load the model with experts=True")
        return self.experts.moe(layer, x, topk_ids, topk_weights, order=order)

    @staticmethod
    def moe_add(h: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
        """Residual add after the MoE block: ``h + combined`` (both ``[T, H]``)."""
        return h + combined.to(h.dtype)

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head: ``[B, H]`` → ``[B, V]``."""
        return self.linear(rms_norm(h_last, self.final_norm, self.config.rms_norm_eps), self.lm_head)

    # ---- single-process conveniences -----------------------------------------------------------
    def make_kv_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        cfg = self.config
        return PagedKVCache(
            cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )

    @torch.inference_mode()
    def forward_step(self, token_ids: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache) -> torch.Tensor:
        """One step with all experts local: token_ids ``[T]`` → logits ``[B, V]`` of each request's last token."""
        h = self.embed(token_ids)
        for layer in range(self.config.num_layers):
            h = self.attention(layer, h, batch, kv)
            x, ids, wts = self.route(layer, h)
            h = self.moe_add(h, self.moe_local(layer, x, ids, wts))
        return self.logits(h[batch.last_token_index.to(h.device)])

    def generate_greedy(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        block_size: int = 16,
        prefill_chunk: int | None = None,
    ) -> list[int]:
        """Greedy continuation of one prompt (new tokens only); stops after ``eos_token_id`` if given.

        ``prefill_chunk`` splits the prompt into chunks of that many tokens (chunked prefill).
        """
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids must not be empty")
        total = len(prompt) + max_new_tokens
        kv = self.make_kv_cache((total + block_size - 1) // block_size, block_size)
        table = kv.reserve(0, total)
        out: list[int] = []
        chunk = prefill_chunk or len(prompt)
        pending, cached = prompt, 0
        while len(out) < max_new_tokens:
            step = pending[:chunk]
            batch = AttentionBatch([table], [cached], [len(step)], block_size)
            logits = self.forward_step(torch.tensor(step, dtype=torch.long), batch, kv)
            cached += len(step)
            pending = pending[len(step) :]
            if pending:
                continue
            tok = int(torch.argmax(logits[0]))
            out.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            pending = [tok]
        return out
