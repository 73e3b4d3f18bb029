"""Fault-tolerant dispatch/combine for one rank's MoE layers (the expert-parallel datapath).

A rank's tokens pick logical experts; the :class:`~resilient_ep.routing.RoutingTable` maps each
choice to a live replica's slot and so to its owner rank. The rank sends each owner a
*dispatch* (the token rows and the logical expert ids), computes its own share locally, serves
other ranks' dispatches while it waits, and sums the *combine* replies in choice order.

Dispatch is request/response, not a collective: an owner answers any dispatch from a member,
whatever step it belongs to, so survivors one step apart never wait on each other, and a reply
made under an older epoch by a surviving owner stays valid (the same expert, the same
batch-invariant kernel, the same bits). When the membership changes while replies are
outstanding, :meth:`MoEExchange.reroute` re-selects the choices that went to a rank now out
and sends them to surviving replicas; nothing else is recomputed.

Glossary: *choice* = one (token, j) pair of the top-k; ``flat = token * k + j``.

The experts a rank holds are anything with the two methods of :class:`ExpertHolder` (in the
reference runtime, its :class:`~resilient_ep.runtime.model.ExpertBank`); this module never
imports a model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..routing import RoutingTable

__all__ = ["ExpertHolder", "MoEExchange", "MoEResult", "serve_dispatch", "UncoveredExpertError"]


class ExpertHolder(Protocol):
    """The experts of one rank, per layer a set of slots (``ExpertBank`` in the reference runtime)."""

    def expert_to_slot(self, layer: int) -> dict[int, int]:
        """Logical expert -> a slot of this rank holding it."""

    def forward(self, layer: int, slot_index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Unweighted expert output ``[N, H]`` of rows ``x [N, H]`` by the experts in ``slot_index [N]``."""


class UncoveredExpertError(RuntimeError):
    """A token picked an expert with no live replica and the policy is ``fail``."""

    def __init__(self, layer: int, experts: list[int]):
        self.layer = layer
        self.experts = experts
        super().__init__(f"layer {layer}: experts {experts} have no live replica")


@dataclass
class MoEResult:
    out: torch.Tensor
    """[T, H] combined expert output (to be added to the residual)."""
    degraded: torch.Tensor
    """[T] bool: some choice of the token had no live replica and was dropped."""
    failed: torch.Tensor
    """[T] bool: policy ``fail`` and some choice of the token was lost (under ``degrade`` a
    token that lost every choice gets no expert output, only its residual)."""
    uncovered: list[int] = field(default_factory=list)
    """Logical experts of this layer that had no live replica."""


_seq = itertools.count()
MAX_ROUTES = 8
"""Routings of one expert choice within a step before it degrades (a membership change
reroutes a choice once; a refusal by a rank that should hold the expert is a bug, bounded)."""


class MoEExchange:
    """One MoE layer's exchange for one rank's batch (begin -> deliver/reroute -> result)."""

    def __init__(self, *, rank: int, transport, table: RoutingTable, bank: ExpertHolder,
                 layer: int, step: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, on_uncovered: str = "degrade",
                 wait_for: frozenset[int] = frozenset()):
        self.rank, self.transport, self.table, self.bank = rank, transport, table, bank
        self.layer, self.step = layer, step
        self.x = x                                          # [T, H]
        self.ids = topk_ids.to(torch.int64)                 # [T, k]
        self.weights = topk_weights.clone()                 # [T, k]
        T, k = self.ids.shape
        self.k = k
        self.y = torch.zeros(T * k, x.shape[1], dtype=x.dtype)   # [T*k, H] per-choice output
        self.done = torch.zeros(T * k, dtype=torch.bool)         # [T*k] reply received
        self.dropped = torch.zeros(T * k, dtype=torch.bool)      # [T*k] no live replica
        self.on_uncovered = on_uncovered
        self.wait_for = frozenset(wait_for)
        """``wait``: the experts a repair is bringing back (a choice of another uncovered
        expert cannot wait for anything and is degraded)."""
        self.pending: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # id -> (dst, flat)
        self.unsent: set[tuple[int, int]] = set()  # refused by a live peer (not connected yet)
        self.uncovered: set[int] = set()
        self.waiting = torch.empty(0, dtype=torch.int64)  # "wait": choices with no replica yet
        self.waited = False
        """Some choice waited for its expert to be repaired (``wait``)."""
        self.routes = torch.zeros(T * k, dtype=torch.int64)
        """Times each choice was routed: a choice whose owner keeps refusing it (a routing
        table that disagrees with the weights a rank holds) degrades at ``MAX_ROUTES``
        instead of bouncing for ever."""
        self._route(torch.arange(T * k))

    # ------------------------------------------------------------------ sending
    def _route(self, flat: torch.Tensor) -> None:
        """Select live replicas for the choices ``flat`` and send them out."""
        if flat.numel() == 0:
            return
        self.routes[flat] += 1
        over = self.routes[flat] > MAX_ROUTES
        if over.any():
            self.dropped[flat[over]] = True
            self.done[flat[over]] = True
            flat = flat[~over]
            if flat.numel() == 0:
                return
        tok, j = flat // self.k, flat % self.k
        ids = self.ids[tok, j]
        sel = self.table.select(self.layer, ids.view(-1, 1), token_offset=tok.view(-1, 1))
        slots = sel.slots.view(-1)
        missing = sel.missing.view(-1)
        if missing.any():
            self.uncovered.update(ids[missing].unique().tolist())
            lost = flat[missing]
            if self.on_uncovered == "wait" and self.wait_for:
                # until the table covers it again (reroute after the repair's flip)
                can = torch.tensor([int(e) in self.wait_for for e in ids[missing].tolist()],
                                   dtype=torch.bool)
                self.waiting = torch.cat([self.waiting, lost[can]])
                self.waited |= bool(can.any())
                lost = lost[~can]
            self.dropped[lost] = True
            self.done[lost] = True
        flat, slots = flat[~missing], slots[~missing]
        if flat.numel() == 0:
            return
        dst = self.table.rank_of(slots)
        local = None
        for d in dst.unique().tolist():
            sub = flat[dst == d]
            if d == self.rank:
                local = sub
                continue
            rid = (self.rank, next(_seq))
            # A refused send stays pending: retried while the peer is a member (it may be
            # reconnecting), rerouted by the membership change if the peer is gone.
            self.pending[rid] = (d, sub)
            if not self._send(rid):
                self.unsent.add(rid)
        if local is not None:  # overlap: the local share is computed after the sends
            rows = self.x[local // self.k]
            self._deliver(local, *expert_forward(self.bank, self.layer, rows,
                                                 self.ids[local // self.k, local % self.k]))

    def _send(self, rid: tuple[int, int]) -> bool:
        d, sub = self.pending[rid]
        return self.transport.send(d, {"t": "dispatch", "id": rid, "layer": self.layer,
                                       "step": self.step},
                                   [self.x[sub // self.k], self.ids[sub // self.k, sub % self.k]])

    def retry(self) -> None:
        """Send again what a live peer refused (its socket was reconnecting)."""
        for rid in list(self.unsent):
            if rid not in self.pending or self._send(rid):
                self.unsent.discard(rid)

    def _deliver(self, flat: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> None:
        self.y[flat[ok]] = y[ok]
        self.done[flat[ok]] = True
        if not bool(ok.all()):  # the owner no longer holds that expert: route again
            self._route(flat[~ok])

    # ------------------------------------------------------------------ receiving
    def on_combine(self, header: dict, tensors: list[torch.Tensor]) -> None:
        entry = self.pending.pop(tuple(header["id"]), None)
        if entry is None:
            return  # a reply to a request already rerouted, or to another layer's exchange
        _dst, flat = entry
        y, ok = tensors
        self._deliver(flat, y, ok)

    def reroute(self, live: frozenset[int], wait_for: frozenset[int] | None = None) -> None:
        """The membership or the layout changed: resend choices whose owner is no longer live,
        and the waiting ones (their expert may be covered again; ``wait_for``: what may still
        be waited for now)."""
        if wait_for is not None:
            self.wait_for = frozenset(wait_for)
        lost = [rid for rid, (dst, _) in self.pending.items() if dst not in live]
        for rid in lost:
            _dst, flat = self.pending.pop(rid)
            self.unsent.discard(rid)
            self._route(flat)
        waiting, self.waiting = self.waiting, torch.empty(0, dtype=torch.int64)
        self._route(waiting)

    def stop_waiting(self) -> None:
        """Give up on the waiting choices (no repair came in time): degrade them."""
        if self.waiting.numel():
            self.dropped[self.waiting] = True
            self.done[self.waiting] = True
            self.waiting = torch.empty(0, dtype=torch.int64)

    @property
    def complete(self) -> bool:
        return not self.pending and not self.waiting.numel() and bool(self.done.all())

    def result(self) -> MoEResult:
        T, k = self.ids.shape
        dropped = self.dropped.view(T, k)
        w = self.weights.clone()
        degraded = dropped.any(dim=1)
        failed = degraded.clone() if self.on_uncovered == "fail" else torch.zeros_like(degraded)
        if degraded.any():
            # Degrade: drop lost choices, renormalise the rest of the token's weights.
            w[dropped] = 0
            total = w.sum(dim=1, keepdim=True)
            w = torch.where(degraded.unsqueeze(1), w / total.clamp(min=1e-20), w)
        y = self.y.view(T, k, -1)
        out = torch.zeros(T, y.shape[2], dtype=y.dtype)
        for j in range(k):  # choice order, as the oracle
            out += w[:, j:j + 1].to(y.dtype) * y[:, j]
        return MoEResult(out, degraded, failed, sorted(self.uncovered))


def expert_forward(bank: ExpertHolder, layer: int, rows: torch.Tensor, experts: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``rows [n, H]`` through the logical ``experts [n]`` held in ``bank``.

    Returns ``(y [n, H], ok [n] bool)``; ``ok`` is False where this rank holds no replica."""
    e2s = bank.expert_to_slot(layer)
    slot = torch.tensor([e2s.get(int(e), -1) for e in experts.tolist()], dtype=torch.int64)
    ok = slot >= 0
    y = torch.zeros_like(rows)
    if ok.any():
        y[ok] = bank.forward(layer, slot[ok], rows[ok])
    return y, ok


def serve_dispatch(transport, bank: ExpertHolder, header: dict, tensors: list[torch.Tensor]
                   ) -> tuple[int, dict, list] | None:
    """Answer another rank's dispatch with a combine message. Returns the reply when the send
    was refused (the origin's socket is reconnecting), for the caller to retry."""
    rows, experts = tensors
    y, ok = expert_forward(bank, header["layer"], rows, experts)
    reply = {"t": "combine", "id": header["id"], "layer": header["layer"]}
    if transport.send(header["src"], reply, [y, ok]):
        return None
    return header["src"], reply, [y, ok]
