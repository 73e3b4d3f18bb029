"""Qwen3-MoE decoder in plain torch, cut into the pieces an expert-parallel runtime drives.

It loads a Hugging Face checkpoint directory (``config.json`` + safetensors) without
``transformers`` and reproduces ``Qwen3MoeForCausalLM`` in fp32 (greedy tokens identical).

Glossary
--------
- **logical expert** ``e in [0, E)``: an expert of the checkpoint (``mlp.experts.{e}``).
- **slot** (physical slot) ``s in [0, S)``: one place in a rank's ``ExpertBank`` that holds the
  weights of one logical expert (or nothing: ``-1``). Slots own storage; which expert a slot holds
  can change (``set_slot``), the storage never moves.
- **step**: one forward pass over a continuous batch; the batch's T new tokens are request 0's
  new tokens, then request 1's, ... (``AttentionBatch``).

Shapes: T tokens in the step, B requests, H hidden, NH query heads, KVH kv heads, D head dim,
I expert intermediate size, E logical experts, S slots of one layer, k top-k, V vocabulary.

How a runtime drives one step (single process: ``MoEModel.forward_step``)::

    h = model.embed(token_ids)                                   # [T, H]
    for layer in range(model.config.num_layers):
        h = model.attention(layer, h, batch, kv)                 # [T, H] (residual added)
        x, topk_ids, topk_weights = model.route(layer, h)        # [T, H], [T, k], [T, k]
        combined = <dispatch x to the ranks holding topk_ids, bank.forward there,
                    weight by topk_weights, combine>             # [T, H]  (or model.moe_local)
        h = model.moe_add(h, combined)                           # h + combined
    logits = model.logits(h[batch.last_token_index])             # [B, V]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from resilient_ep.runtime.kv_cache import PagedKVCache

__all__ = [
    "MoEConfig",
    "AttentionBatch",
    "ExpertWeights",
    "ExpertBank",
    "MoEModel",
    "CheckpointReader",
]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Checkpoint reading (lazy, per tensor)
# ---------------------------------------------------------------------------------------------
class CheckpointReader:
    """Reads single tensors from a safetensors checkpoint (one file or an indexed shard set).

    Use as a context manager; files are opened lazily with ``safetensors.safe_open`` so that
    reading one expert reads only that expert's bytes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self._key_file = {k: self.path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.path}")
            self._key_file = {}
            from safetensors import safe_open

            for f in files:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        self._key_file[k] = f
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def _handle(self, key: str):
        if key not in self._key_file:
            raise KeyError(f"tensor {key!r} not in checkpoint {self.path}")
        f = self._key_file[key]
        if f not in self._open:
            from safetensors import safe_open

            self._open[f] = self._stack.enter_context(safe_open(f, framework="pt"))
        return self._open[f]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that row."""
        return self._handle(key).get_slice(key)[index]

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """Weights of one logical expert, per-expert keys or v5 fused ``gate_up_proj``/``down_proj``."""
        pre = f"model.layers.{layer}.mlp.experts"
        per = f"{pre}.{expert}.gate_proj.weight"
        if per in self:
            gate = self.get(per)
            up = self.get(f"{pre}.{expert}.up_proj.weight")
            down = self.get(f"{pre}.{expert}.down_proj.weight")
            return ExpertWeights(torch.cat([gate, up], dim=0), down)
        fused = f"{pre}.gate_up_proj"
        if fused in self:
            return ExpertWeights(self.get_row(fused, expert), self.get_row(f"{pre}.down_proj", expert))
        raise KeyError(f"expert {expert} of layer {layer} not found in {self.path} (looked for {per}, {fused})")


# ---------------------------------------------------------------------------------------------
# Small math helpers (written to match transformers' Qwen3Moe op for op)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Attention batch
# ---------------------------------------------------------------------------------------------
@dataclass
class AttentionBatch:
    """A continuous batch: per request, its block table, tokens cached before and new in this step.

    Prefill chunks and decode tokens mix freely: a decode request has ``num_new == 1``; a
    prefill chunk has ``num_new > 1`` and ``num_cached`` = tokens of earlier chunks.
    The new tokens of the step are laid out request by request, in list order. Build one per
    step; every layer reuses its index tensors.

    Example (block_size 4): ``block_tables=[[0, 1], [2]]``, ``num_cached=[5, 0]``,
    ``num_new=[1, 3]`` → T=4, ``positions=[5, 0, 1, 2]``, ``slots=[5, 8, 9, 10]``,
    ``query_start=[0, 1, 4]``, ``last_token_index=[0, 3]``.

    Derived (``__post_init__``):
    - ``positions``        ``[T]`` int64  position of each new token in its request
    - ``slots``            ``[T]`` int64  flat KV slot ``block * block_size + offset``
    - ``query_start``      ``B+1`` ints   request r owns tokens ``query_start[r]:query_start[r+1]``
    - ``last_token_index`` ``[B]`` int64  index in T of each request's last new token
    - ``decode_requests``  Bd ints  the requests with ``num_new == 1``, in order
    - ``decode_token_index`` ``[Bd]`` int64  index in T of each decode request's token
    - ``decode_kv_slots``  ``[Bd, Nmax]`` int64  KV slots of positions ``0 .. cached`` of each
      decode request, right-padded; ``decode_kv_mask`` ``[Bd, Nmax]`` bool (True = real key)
    - ``prefill``          list of ``(r, kv_slots [cached+new])`` for requests with ``num_new > 1``
    """

    block_tables: list[list[int]]
    num_cached: list[int]
    num_new: list[int]
    block_size: int
    positions: torch.Tensor = field(init=False, repr=False)
    slots: torch.Tensor = field(init=False, repr=False)
    query_start: list[int] = field(init=False, repr=False)
    last_token_index: torch.Tensor = field(init=False, repr=False)
    decode_requests: list[int] = field(init=False, repr=False)
    decode_token_index: torch.Tensor = field(init=False, repr=False)
    decode_kv_slots: torch.Tensor = field(init=False, repr=False)
    decode_kv_mask: torch.Tensor = field(init=False, repr=False)
    prefill: list[tuple[int, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        b, bs = len(self.block_tables), self.block_size
        if len(self.num_cached) != b or len(self.num_new) != b:
            raise ValueError(
                f"block_tables ({b}), num_cached ({len(self.num_cached)}) and num_new "
                f"({len(self.num_new)}) must have one entry per request"
            )
        if bs <= 0:
            raise ValueError(f"block_size ({bs}) must be > 0")
        starts = [0]
        for r, (table, cached, new) in enumerate(zip(self.block_tables, self.num_cached, self.num_new)):
            if new <= 0 or cached < 0:
                raise ValueError(f"request {r}: num_new ({new}) must be > 0 and num_cached ({cached}) >= 0")
            need = (cached + new + bs - 1) // bs
            if len(table) < need:
                raise ValueError(
                    f"request {r}: {cached + new} tokens need {need} blocks of {bs}, "
                    f"block table has {len(table)}"
                )
            starts.append(starts[-1] + new)
        self.query_start = starts
        self.last_token_index = torch.as_tensor(starts[1:], dtype=torch.long) - 1
        width = max((len(t) for t in self.block_tables), default=1) or 1
        tables = torch.zeros(b, width, dtype=torch.long)  # [B, maxblocks], padded with block 0
        for r, t in enumerate(self.block_tables):
            tables[r, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        cached_t = torch.as_tensor(self.num_cached, dtype=torch.long)
        new_t = torch.as_tensor(self.num_new, dtype=torch.long)

        # New tokens of the step.
        req = torch.repeat_interleave(torch.arange(b), new_t)  # [T] request of each token
        start_t = torch.as_tensor(starts[:-1], dtype=torch.long)
        self.positions = cached_t[req] + torch.arange(starts[-1]) - start_t[req]  # [T]
        self.slots = tables[req, self.positions // bs] * bs + self.positions % bs  # [T]

        # Decode requests: one padded gather for all of them.
        dec = (new_t == 1).nonzero().squeeze(1)  # [Bd]
        self.decode_requests = dec.tolist()
        self.decode_token_index = start_t[dec]
        lens = cached_t[dec] + 1  # [Bd]
        nmax = int(lens.max()) if dec.numel() else 0
        pos = torch.arange(nmax)
        blk = tables[dec][:, (pos // bs).clamp(max=width - 1)]  # [Bd, Nmax]
        self.decode_kv_slots = blk * bs + pos % bs
        self.decode_kv_mask = pos[None, :] < lens[:, None]

        # Prefill chunks: one gather each.
        self.prefill = []
        for r in (new_t > 1).nonzero().squeeze(1).tolist():
            p = torch.arange(self.num_cached[r] + self.num_new[r])
            self.prefill.append((r, tables[r, p // bs] * bs + p % bs))

    @property
    def num_requests(self) -> int:
        return len(self.block_tables)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------
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


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``linear(x [N, in], weight [out, in]) -> [N, out]``: ``F.linear`` or a batch-invariant one."""


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for x ``[N, H]``, gate_up ``[2I, H]``, down ``[H, I]``."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [N, I] each
    return linear(F.silu(gate) * up, down)  # [N, H]


class ExpertBank:
    """The expert weights one rank holds, per layer a stack over its physical slots.

    - ``gate_up[layer]``  ``[S, 2I, H]``
    - ``down[layer]``     ``[S, H, I]``
    - ``slot_experts[layer]``  list of S ints: the logical expert in each slot, ``-1`` = empty
      (an empty slot's weights are zero).
    - ``linear``  the matmul used for every projection (default ``F.linear``); set it to a
      batch-invariant one to make a token's output independent of the other tokens in the call.

    Example: ``ExpertBank.load(dir, {0: [3, 5, -1], 1: [3, 5, -1]})`` holds experts 3 and 5 of
    layers 0 and 1 in slots 0 and 1, and a spare slot 2 (for a replica or a shadow).
    """

    def __init__(
        self,
        slot_experts: Mapping[int, Sequence[int]],
        gate_up: Mapping[int, torch.Tensor],
        down: Mapping[int, torch.Tensor],
    ) -> None:
        self.slot_experts = {int(l): [int(e) for e in s] for l, s in slot_experts.items()}
        self.gate_up = dict(gate_up)
        self.down = dict(down)
        self._e2s: dict[int, dict[int, int]] = {}
        self.linear: Linear = F.linear  # swap in a batch-invariant linear (same signature)
        for l, s in self.slot_experts.items():
            if self.gate_up[l].shape[0] != len(s) or self.down[l].shape[0] != len(s):
                raise ValueError(
                    f"layer {l}: {len(s)} slots but gate_up {tuple(self.gate_up[l].shape)}, "
                    f"down {tuple(self.down[l].shape)}"
                )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        slots: Mapping[int, Sequence[int]],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ExpertBank:
        """Load only the experts named in ``slots`` (layer → logical expert per slot, -1 = empty)."""
        cfg = MoEConfig.from_dir(path)
        hdim, idim = cfg.hidden_size, cfg.moe_intermediate_size
        gate_up, down = {}, {}
        with CheckpointReader(path) as ckpt:
            for layer, experts in slots.items():
                if not 0 <= layer < cfg.num_layers:
                    raise ValueError(f"layer ({layer}) must be in [0, {cfg.num_layers})")
                gu = torch.zeros(len(experts), 2 * idim, hdim, dtype=dtype, device=device)
                dn = torch.zeros(len(experts), hdim, idim, dtype=dtype, device=device)
                for s, e in enumerate(experts):
                    if e == -1:
                        continue
                    if not 0 <= e < cfg.num_experts:
                        raise ValueError(f"layer {layer} slot {s}: expert ({e}) must be in [0, {cfg.num_experts}) or -1")
                    w = ckpt.expert(layer, e)
                    gu[s].copy_(w.gate_up)
                    dn[s].copy_(w.down)
                gate_up[layer], down[layer] = gu, dn
        return cls(slots, gate_up, down)

    @staticmethod
    def read_expert(path: str | os.PathLike[str], layer: int, expert: int) -> ExpertWeights:
        """One expert's weights straight from the checkpoint (the 'disk' repair source)."""
        with CheckpointReader(path) as ckpt:
            return ckpt.expert(layer, expert)

    @property
    def layers(self) -> list[int]:
        return sorted(self.slot_experts)

    def num_slots(self, layer: int) -> int:
        return len(self.slot_experts[layer])

    def expert_to_slot(self, layer: int) -> dict[int, int]:
        """Logical expert → first slot holding it, for this layer (cached; do not mutate)."""
        if layer not in self._e2s:
            out: dict[int, int] = {}
            for s, e in enumerate(self.slot_experts[layer]):
                if e >= 0:
                    out.setdefault(e, s)
            self._e2s[layer] = out
        return self._e2s[layer]

    def get_slot(self, layer: int, slot: int) -> ExpertWeights:
        """The weights in ``slot``, as views into the bank (clone them to keep a copy)."""
        self._check(layer, slot)
        return ExpertWeights(self.gate_up[layer][slot], self.down[layer][slot])

    def set_slot(self, layer: int, slot: int, weights: ExpertWeights | None, expert: int | None = None) -> None:
        """Copy ``weights`` into ``slot`` in place (storage unchanged) and record its logical expert.

        ``weights=None`` empties the slot (zeros, expert -1). ``expert=None`` keeps the label.
        """
        self._check(layer, slot)
        if weights is None:
            self.gate_up[layer][slot].zero_()
            self.down[layer][slot].zero_()
            self.slot_experts[layer][slot] = -1
            self._e2s.pop(layer, None)
            return
        if weights.gate_up.shape != self.gate_up[layer].shape[1:] or weights.down.shape != self.down[layer].shape[1:]:
            raise ValueError(
                f"weights gate_up {tuple(weights.gate_up.shape)} / down {tuple(weights.down.shape)} must be "
                f"{tuple(self.gate_up[layer].shape[1:])} / {tuple(self.down[layer].shape[1:])}"
            )
        self.gate_up[layer][slot].copy_(weights.gate_up)
        self.down[layer][slot].copy_(weights.down)
        if expert is not None:
            self.slot_experts[layer][slot] = int(expert)
            self._e2s.pop(layer, None)

    def forward(self, layer: int, slot_index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each token by the expert in its slot: slot_index ``[N]`` int64, x ``[N, H]`` → ``[N, H]``.

        Tokens are grouped by slot (one matmul pair per slot used). Unweighted: the caller
        multiplies by the routing weight and sums over the top-k.
        """
        if slot_index.shape != (x.shape[0],):
            raise ValueError(f"slot_index {tuple(slot_index.shape)} must be [{x.shape[0]}] (one per row of x)")
        out = torch.empty_like(x)
        if x.shape[0] == 0:
            return out
        n_slots = self.num_slots(layer)
        lo, hi = int(slot_index.min()), int(slot_index.max())
        if lo < 0 or hi >= n_slots:
            raise ValueError(f"layer {layer}: slot index range [{lo}, {hi}] outside [0, {n_slots})")
        order = torch.argsort(slot_index, stable=True)
        counts = torch.bincount(slot_index, minlength=n_slots).tolist()
        gu, dn, experts = self.gate_up[layer], self.down[layer], self.slot_experts[layer]
        start = 0
        for s, c in enumerate(counts):
            if c == 0:
                continue
            if experts[s] < 0:
                raise ValueError(f"layer {layer}: {c} tokens sent to empty slot {s}")
            rows = order[start : start + c]
            out[rows] = swiglu(x[rows], gu[s], dn[s], self.linear)
            start += c
        return out

    def moe(
        self,
        layer: int,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        order: str = "expert",
    ) -> torch.Tensor:
        """Weighted MoE output ``[T, H]`` of x ``[T, H]`` for logical ``topk_ids [T, k]``, weights ``[T, k]``.

        Every expert in ``topk_ids`` must be in this bank. ``order`` fixes the summation order
        of a token's k contributions: ``"expert"`` (ascending expert id, ``index_add_``, as
        transformers) or ``"choice"`` (``out = 0; out += w[:, j] * y[:, j]`` for j = 0..k-1, as
        a dispatch/combine does). Both give the same bits when k <= 2 (a + b == b + a).
        """
        e2s = self.expert_to_slot(layer)
        missing = sorted(set(torch.unique(topk_ids).tolist()) - set(e2s))
        if missing:
            raise ValueError(f"layer {layer}: experts {missing} are not in this bank (slots {self.slot_experts[layer]})")
        if order == "choice":
            t, k = topk_ids.shape
            lut = torch.full((max(e2s) + 1,), -1, dtype=torch.long)
            lut[list(e2s)] = torch.tensor(list(e2s.values()), dtype=torch.long)
            y = self.forward(layer, lut[topk_ids.reshape(-1).cpu()].to(x.device), x.repeat_interleave(k, dim=0))
            y = y.view(t, k, -1)  # [T, k, H]
            out = torch.zeros_like(x)
            for j in range(k):
                out += topk_weights[:, j : j + 1].to(x.dtype) * y[:, j]
            return out
        if order != "expert":
            raise ValueError(f"order ({order!r}) must be 'expert' or 'choice'")
        out = torch.zeros_like(x)
        gu, dn = self.gate_up[layer], self.down[layer]
        for e in torch.unique(topk_ids).tolist():
            s = e2s[e]
            tok, kpos = torch.where(topk_ids == e)
            y = swiglu(x[tok], gu[s], dn[s], self.linear) * topk_weights[tok, kpos, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out

    def _check(self, layer: int, slot: int) -> None:
        if layer not in self.slot_experts:
            raise KeyError(f"layer ({layer}) not in this bank (layers {self.layers})")
        if not 0 <= slot < self.num_slots(layer):
            raise IndexError(f"slot ({slot}) must be in [0, {self.num_slots(layer)}) for layer {layer}")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
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
            self._attend_batched(layer, q, batch, kv, out)
        elif self.attention_mode == "per_row":
            self._attend_per_row(layer, q, batch, kv, out)
        else:
            raise ValueError(f"attention_mode ({self.attention_mode!r}) must be one of {self.ATTENTION_MODES}")
        return h + self.linear(out.reshape(t, cfg.num_heads * cfg.head_dim), w.o_proj)

    def _attend_batched(
        self, layer: int, q: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache, out: torch.Tensor
    ) -> None:
        """Decode requests in one padded call, each prefill chunk in one causal call; fills ``out``."""
        scale, dev = self.config.head_dim**-0.5, kv.kv.device
        if batch.decode_token_index.numel():
            # q [Bd, NH, 1, D] against padded keys [Bd, KVH, Nmax, D].
            di = batch.decode_token_index.to(q.device)
            keys, vals = kv.gather_slots(layer, batch.decode_kv_slots.to(dev))  # [Bd, Nmax, KVH, D]
            mask = batch.decode_kv_mask.to(q.device)[:, None, None, :]  # [Bd, 1, 1, Nmax]
            o = F.scaled_dot_product_attention(
                q[di].unsqueeze(2),
                keys.to(q.dtype).transpose(1, 2),
                vals.to(q.dtype).transpose(1, 2),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )  # [Bd, NH, 1, D]
            out[di] = o.squeeze(2)
        for r, kv_slots in batch.prefill:
            a, b = batch.query_start[r], batch.query_start[r + 1]
            cached, new = batch.num_cached[r], b - a
            keys, vals = kv.gather_slots(layer, kv_slots.to(dev))  # [N, KVH, D]
            qr = q[a:b].transpose(0, 1).unsqueeze(0)  # [1, NH, n, D]
            kr = keys.to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, N, D]
            vr = vals.to(q.dtype).transpose(0, 1).unsqueeze(0)
            if cached == 0:
                mask, causal = None, True
            else:  # query i sits at position cached + i and sees keys 0 .. cached + i
                qi = torch.arange(new, device=q.device)[:, None]
                kj = torch.arange(cached + new, device=q.device)[None, :]
                mask, causal = kj <= qi + cached, False
            o = F.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
            )  # [1, NH, n, D]
            out[a:b] = o[0].transpose(0, 1)

    def _attend_per_row(
        self, layer: int, q: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache, out: torch.Tensor
    ) -> None:
        """Each new token in its own call over keys ``0 .. its position`` (batch-invariant); fills ``out``."""
        scale, dev = self.config.head_dim**-0.5, kv.kv.device
        per_request = dict(batch.prefill)
        for j, r in enumerate(batch.decode_requests):
            per_request[r] = batch.decode_kv_slots[j, : batch.num_cached[r] + 1]
        for r in range(batch.num_requests):
            a, b = batch.query_start[r], batch.query_start[r + 1]
            keys, vals = kv.gather_slots(layer, per_request[r].to(dev))  # [N, KVH, D]
            keys = keys.to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, N, D]
            vals = vals.to(q.dtype).transpose(0, 1).unsqueeze(0)
            for i in range(b - a):
                n = batch.num_cached[r] + i + 1
                o = F.scaled_dot_product_attention(
                    q[a + i][None, :, None, :], keys[:, :, :n], vals[:, :, :n], scale=scale, enable_gqa=True
                )  # [1, NH, 1, D]
                out[a + i] = o[0, :, 0]

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
