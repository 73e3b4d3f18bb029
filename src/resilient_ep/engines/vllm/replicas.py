"""Mirror replicas of experts on vLLM ranks, and the live expert maps derived from them.

vLLM gives each of ``N`` EP ranks a contiguous block of ``B = E / N`` experts and an
``expert_map`` (global expert -> local slot, -1 elsewhere) that every MoE kernel reads. With
failover on, each rank *holds* ``k`` blocks (``k = min(N, 2)``): its own block ``r`` and the
next ``k - 1`` blocks around the ring, so every expert has ``k`` replicas on distinct ranks and
one dead rank leaves every expert covered. Each expert is *active* on exactly one holder, the
first live one of ``b, b-1, ..., b-k+1`` for block ``b``: while all ranks live that is vLLM's
own assignment (same experts on the same ranks, same results), and after a death the next rank
around the ring takes the dead rank's blocks over.

The placement is a core :class:`~resilient_ep.layout.ExpertLayout` and liveness the core's
:class:`~resilient_ep.membership.Membership` (fed by the worker failover group). The weight
loader fills the held slots (it reads the manager's *held* map); the forward pass reads a
separate *active* map tensor per layer (``RoutedExperts._expert_map``), which this module
rewrites in place (``copy_``: same storage, so CUDA graphs that captured it stay valid) from
the membership's live mask whenever it changes.
"""

from __future__ import annotations

import threading

import torch

from resilient_ep.layout import ExpertLayout
from resilient_ep.membership import Membership

__all__ = ["RingReplicas", "register_active_map", "set_dead_ranks", "reset", "membership",
           "registered_layers"]


class RingReplicas:
    """The ring-mirror placement as the core's :class:`~resilient_ep.layout.ExpertLayout`
    (one row: every MoE layer of a vLLM model is placed alike), with vLLM's local slot
    numbering and the owner-first preference among live replicas."""

    def __init__(self, num_experts: int, num_ranks: int, copies: int | None = None):
        if num_ranks < 1 or num_experts % num_ranks:
            raise ValueError(
                f"mirror replicas need the expert count ({num_experts}) to be a multiple of "
                f"the EP size ({num_ranks})")
        self.E, self.N = num_experts, num_ranks
        self.k = min(num_ranks, 2) if copies is None else copies
        self.B = num_experts // num_ranks
        row = [((r + j) % self.N) * self.B + i
               for r in range(self.N) for j in range(self.k) for i in range(self.B)]
        self.layout = ExpertLayout.from_mapping(row, num_ranks=self.N, num_experts=self.E)

    def local_count(self) -> int:
        return self.layout.slots_per_rank

    def held_map(self, rank: int) -> torch.Tensor:
        """vLLM's ``expert_map`` for what ``rank`` holds: global expert -> local slot."""
        m = torch.full((self.E,), -1, dtype=torch.int32)
        for slot, e in enumerate(self.layout.experts_on_rank(0, rank)):
            if e >= 0:
                m[e] = slot
        return m

    def holders(self, expert: int) -> list[int]:
        """Ranks holding ``expert``, owner (vLLM's rank for it) first."""
        owner = expert // self.B
        return sorted(self.layout.replica_ranks(0, expert), key=lambda r: (owner - r) % self.N)

    def active_map(self, rank: int, live_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``expert_map`` of the experts ``rank`` serves: each expert on its first live holder."""
        live = torch.ones(self.N, dtype=torch.bool) if live_mask is None else live_mask.cpu()
        held = self.held_map(rank)
        out = torch.full_like(held, -1)
        for e in range(self.E):
            first = next((r for r in self.holders(e) if live[r]), None)
            if first == rank:
                out[e] = held[e]
        return out

    def uncovered(self, live_mask: torch.Tensor) -> list[int]:
        return [e for _, e in self.layout.uncovered(live_mask)]


_lock = threading.Lock()
_layers: list[tuple[torch.Tensor, RingReplicas, int]] = []
_membership: Membership | None = None


def _live_mask(num_ranks: int) -> torch.Tensor:
    global _membership
    if _membership is None:
        _membership = Membership(num_ranks)
    return _membership.live_mask


def register_active_map(tensor: torch.Tensor, ring: RingReplicas, ep_rank: int) -> None:
    with _lock:
        _layers.append((tensor, ring, ep_rank))
        tensor.copy_(ring.active_map(ep_rank, _live_mask(ring.N)).to(tensor.device, tensor.dtype))


def set_dead_ranks(dead_ep_ranks) -> None:
    """The EP ranks now dead: the core's membership takes them out (one epoch), and every
    registered layer's active map is rewritten in place."""
    with _lock:
        if not _layers:
            return
        mask = _live_mask(_layers[0][1].N)
        _membership.fail(sorted(set(dead_ep_ranks)))
        for tensor, ring, rank in _layers:
            tensor.copy_(ring.active_map(rank, mask).to(tensor.device, tensor.dtype))


def reset() -> None:
    """Forget every layer and the membership (a new model in this process; tests)."""
    global _membership
    with _lock:
        _layers.clear()
        _membership = None


def membership() -> Membership | None:
    """This worker's view of the EP ranks (None until a layer registered)."""
    return _membership


def registered_layers() -> int:
    return len(_layers)
