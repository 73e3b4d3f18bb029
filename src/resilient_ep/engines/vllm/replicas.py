"""Mirror replicas of experts on vLLM ranks, and the live expert maps derived from them.

vLLM gives each of ``N`` EP ranks a contiguous block of ``B = E / N`` experts and an
``expert_map`` (global expert -> local slot, -1 elsewhere) that every MoE kernel reads. With
failover on, each rank *holds* ``k`` blocks (``k = min(N, 2)``): its own block ``r`` and the
next ``k - 1`` blocks around the ring, so every expert has ``k`` replicas on distinct ranks and
one dead rank leaves every expert covered. Each expert is *active* on exactly one holder, the
first live one of ``b, b-1, ..., b-k+1`` for block ``b``: while all ranks live that is vLLM's
own assignment (same experts on the same ranks, same results), and after a death the next rank
around the ring takes the dead rank's blocks over.

The weight loader fills the held slots (it reads the manager's *held* map); the forward pass
reads a separate *active* map tensor per layer (``RoutedExperts._expert_map``), which this
module rewrites in place (``copy_``: same storage, so CUDA graphs that captured it stay valid)
whenever the dead set changes.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["RingReplicas", "register_active_map", "set_dead_ranks", "dead_ranks",
           "registered_layers"]


class RingReplicas:
    def __init__(self, num_experts: int, num_ranks: int, copies: int | None = None):
        if num_ranks < 1 or num_experts % num_ranks:
            raise ValueError(
                f"mirror replicas need the expert count ({num_experts}) to be a multiple of "
                f"the EP size ({num_ranks})")
        self.E, self.N = num_experts, num_ranks
        self.k = min(num_ranks, 2) if copies is None else copies
        self.B = num_experts // num_ranks

    def held_blocks(self, rank: int) -> list[int]:
        return [(rank + j) % self.N for j in range(self.k)]

    def holders(self, block: int) -> list[int]:
        """Ranks holding ``block``, in order of preference (owner first)."""
        return [(block - j) % self.N for j in range(self.k)]

    def local_count(self) -> int:
        return self.k * self.B

    def held_map(self, rank: int) -> torch.Tensor:
        m = torch.full((self.E,), -1, dtype=torch.int32)
        for j, b in enumerate(self.held_blocks(rank)):
            m[b * self.B:(b + 1) * self.B] = torch.arange(j * self.B, (j + 1) * self.B,
                                                          dtype=torch.int32)
        return m

    def active_rank(self, block: int, dead: frozenset[int] | set[int]) -> int | None:
        for r in self.holders(block):
            if r not in dead:
                return r
        return None

    def active_map(self, rank: int, dead: frozenset[int] | set[int] = frozenset()) -> torch.Tensor:
        held = self.held_map(rank)
        out = torch.full_like(held, -1)
        for b in range(self.N):
            if self.active_rank(b, dead) == rank:
                out[b * self.B:(b + 1) * self.B] = held[b * self.B:(b + 1) * self.B]
        return out

    def uncovered(self, dead) -> list[int]:
        return [e for b in range(self.N) if self.active_rank(b, dead) is None
                for e in range(b * self.B, (b + 1) * self.B)]


_lock = threading.Lock()
_layers: list[tuple[torch.Tensor, RingReplicas, int]] = []
_dead: frozenset[int] = frozenset()


def register_active_map(tensor: torch.Tensor, ring: RingReplicas, ep_rank: int) -> None:
    with _lock:
        _layers.append((tensor, ring, ep_rank))
        tensor.copy_(ring.active_map(ep_rank, _dead).to(tensor.device, tensor.dtype))


def set_dead_ranks(dead_ep_ranks) -> None:
    """The EP ranks now dead: rewrite every registered layer's active map in place."""
    global _dead
    with _lock:
        _dead = frozenset(dead_ep_ranks)
        for tensor, ring, rank in _layers:
            tensor.copy_(ring.active_map(rank, _dead).to(tensor.device, tensor.dtype))


def dead_ranks() -> frozenset[int]:
    return _dead


def registered_layers() -> int:
    return len(_layers)
