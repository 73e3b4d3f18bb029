"""The experts one rank holds: :class:`ExpertBank`, per layer a stack of physical slots, each
holding one logical expert's weights (or nothing), filled from the checkpoint and changed in
place (repair, replicas), and the grouped SwiGLU over them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointReader
from .config import MoEConfig
from .layers import Linear, swiglu
from .weights import ExpertWeights

__all__ = ["ExpertBank"]


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
