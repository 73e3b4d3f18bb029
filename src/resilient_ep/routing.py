"""Routing tables: an expert layout as fixed-shape tensors on a device, patched in place.

A :class:`RoutingTable` holds, per MoE layer, the *live* replicas of each logical expert:

- ``live_l2p [L, E, K]`` int64: slots of each expert's replicas on live ranks, compacted to the
  front and padded with -1. Example, E=2, K=2, expert 0 in slots 0 and 4, rank of slot 0 dead:
  ``[[[4, -1], [1, -1]]]``.
- ``live_count [L, E]`` int64: number of non-padding entries of ``live_l2p`` (0 = uncovered).
- ``physical_to_logical [L, P]`` int64: the layout's slot -> expert map (-1 empty), for the
  expert side to know what each of its slots holds.
- ``rank_live [R]`` bool: the membership's live mask.
- ``epoch [1]`` int64: the membership epoch the table was last written under.

Every tensor is allocated once; :meth:`RoutingTable.update` writes new values with ``copy_``,
so ``data_ptr()`` never changes and a captured CUDA graph that reads these tensors routes by
the new layout on its next replay, with no re-capture.

:meth:`RoutingTable.select` maps router output (logical ids ``[T, k]``) to physical slots
using only live replicas, deterministically, spreading a token's choice over replicas by token
index; a choice whose expert has no live replica is returned as slot -1 and flagged in
``missing``, never silently dropped. It is pure tensor code (graph-capturable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import ExpertLayout, LayoutError

__all__ = ["RoutingTable", "Selection"]


@dataclass
class Selection:
    slots: torch.Tensor
    """[T, k] int64 physical slot for each (token, choice); -1 where ``missing``."""
    missing: torch.Tensor
    """[T, k] bool: the chosen logical expert has no live replica."""

    @property
    def any_missing(self) -> bool:
        return bool(self.missing.any())


class RoutingTable:
    def __init__(self, layout: ExpertLayout, live_mask: torch.Tensor | None = None, *,
                 epoch: int = 0, device: torch.device | str = "cpu"):
        self.num_layers = layout.num_layers
        self.num_experts = layout.num_experts
        self.num_slots = layout.num_slots
        self.num_ranks = layout.num_ranks
        self.slots_per_rank = layout.slots_per_rank
        self.max_replicas = layout.max_replicas
        self.device = torch.device(device)
        L, E, K, P, R = (self.num_layers, self.num_experts, self.max_replicas, self.num_slots,
                         self.num_ranks)
        self.live_l2p = torch.full((L, E, K), -1, dtype=torch.int64, device=self.device)
        self.live_count = torch.zeros((L, E), dtype=torch.int64, device=self.device)
        self.physical_to_logical = torch.full((L, P), -1, dtype=torch.int64, device=self.device)
        self.rank_live = torch.ones(R, dtype=torch.bool, device=self.device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._epoch = epoch
        self._layout = layout
        self.update(layout, live_mask, epoch=epoch)

    # ------------------------------------------------------------------ writing
    @property
    def layout(self) -> ExpertLayout:
        return self._layout

    @property
    def epoch_value(self) -> int:
        return self._epoch

    def update(self, layout: ExpertLayout | None = None, live_mask: torch.Tensor | None = None,
               *, epoch: int | None = None) -> None:
        """Write a new layout and/or live mask in place (``copy_``; storage never moves)."""
        layout = layout if layout is not None else self._layout
        if (layout.num_layers, layout.num_experts, layout.num_slots, layout.num_ranks) != (
                self.num_layers, self.num_experts, self.num_slots, self.num_ranks):
            raise LayoutError(
                f"layout [L={layout.num_layers}, E={layout.num_experts}, P={layout.num_slots}, "
                f"R={layout.num_ranks}] does not fit this table [L={self.num_layers}, "
                f"E={self.num_experts}, P={self.num_slots}, R={self.num_ranks}]")
        if layout.max_replicas > self.max_replicas:
            raise LayoutError(f"layout has up to {layout.max_replicas} replicas per expert; the "
                              f"table was sized for {self.max_replicas} (max_replicas)")
        if live_mask is None:
            live_mask = self.rank_live.cpu()
        live_mask = torch.as_tensor(live_mask, dtype=torch.bool).cpu()
        if live_mask.shape != (self.num_ranks,):
            raise LayoutError(f"live mask must be [{self.num_ranks}], got {tuple(live_mask.shape)}")
        live_l2p, live_count = _live_tables(layout, live_mask, self.max_replicas)
        self.live_l2p.copy_(live_l2p)
        self.live_count.copy_(live_count)
        self.physical_to_logical.copy_(layout.physical_to_logical)
        self.rank_live.copy_(live_mask)
        if epoch is not None:
            self._epoch = epoch
            self.epoch.fill_(epoch)
        self._layout = layout

    # ------------------------------------------------------------------ reading
    def select(self, layer: int, topk_ids: torch.Tensor, token_offset: int | torch.Tensor = 0
               ) -> Selection:
        """Physical slots for logical ``topk_ids [T, k]`` of ``layer``.

        Replica choice: ``(token_index + token_offset + expert_id) % live_count`` — the same
        inputs give the same slots on every rank, and consecutive tokens alternate replicas.
        """
        ids = topk_ids.to(torch.int64)
        T = ids.shape[0]
        counts = self.live_count[layer][ids]  # [T, k]
        tok = torch.arange(T, device=ids.device, dtype=torch.int64).unsqueeze(1) + token_offset
        pick = (tok + ids) % counts.clamp(min=1)  # [T, k]
        slots = self.live_l2p[layer][ids, pick]  # [T, k]
        missing = counts == 0
        return Selection(torch.where(missing, torch.full_like(slots, -1), slots), missing)

    def rank_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Rank owning each slot (-1 stays -1)."""
        return torch.where(slots >= 0, torch.div(slots, self.slots_per_rank, rounding_mode="floor"),
                           slots)

    def uncovered(self) -> list[tuple[int, int]]:
        """(layer, expert) with no live replica right now."""
        return [tuple(x) for x in (self.live_count == 0).nonzero().cpu().tolist()]

    def storage_ptrs(self) -> tuple[int, ...]:
        """Addresses of every table tensor (tests assert they never change)."""
        return tuple(t.data_ptr() for t in (self.live_l2p, self.live_count,
                                            self.physical_to_logical, self.rank_live, self.epoch))


def _live_tables(layout: ExpertLayout, live_mask: torch.Tensor, k: int):
    """(live_l2p [L, E, k], live_count [L, E]) keeping only replicas on live ranks."""
    l2p = layout.logical_to_physical  # [L, E, K0], ascending then -1
    valid = l2p >= 0
    rank = torch.where(valid, l2p // layout.slots_per_rank, torch.zeros_like(l2p))
    keep = valid & live_mask[rank]
    # Stable compaction: kept entries first, in their original (ascending) order.
    order = torch.sort((~keep).to(torch.int8), dim=2, stable=True).indices
    compact = torch.where(keep, l2p, torch.full_like(l2p, -1)).gather(2, order)
    count = keep.sum(dim=2)
    out = torch.full((layout.num_layers, layout.num_experts, k), -1, dtype=torch.int64)
    out[:, :, :compact.shape[2]] = compact
    return out, count
