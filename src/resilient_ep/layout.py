"""Expert layout: which logical expert lives in which physical slot on which rank.

Glossary
- *logical expert* ``e`` in ``[0, E)``: an expert of the model, what the router picks.
- *rank* ``r`` in ``[0, R)``: one EP process (one GPU). Ranks are numbered node-major:
  rank ``r`` sits on node ``r // ranks_per_node``.
- *physical slot* ``p`` in ``[0, R*S)``: room for one expert's weights; rank ``r`` owns slots
  ``[r*S, (r+1)*S)``. ``S`` = slots per rank = E/R base slots + redundant slots.
- *replica*: one physical slot holding a logical expert. An expert may have several replicas,
  on distinct ranks when placement is fault-aware; tokens are spread over its live replicas.
- *shadow expert*: a copy of an expert kept outside the routed slots (residual memory),
  promoted into a slot when the last routed replica dies (see ``shadow``).
- *covered*: an expert with at least one replica on a live rank.

Tensors (all int64, CPU, one row per MoE layer ``l`` in ``[0, L)``):
- ``physical_to_logical [L, R*S]``: logical expert held by each slot, -1 for an empty slot.
  Example, E=4, R=2, S=3: ``[[0, 1, 2, 3, 0, -1]]`` -> expert 0 has replicas in slots 0 and 4.
- ``logical_to_physical [L, E, K]``: each expert's replica slots in ascending order, padded
  with -1; ``K`` = max_replicas (fixed width, so tables can be patched in place).
  Same example with K=2: ``[[[0, 4], [1, -1], [2, -1], [3, -1]]]``.
- ``replica_count [L, E]``: number of non-padding entries of ``logical_to_physical``.
  Same example: ``[[2, 1, 1, 1]]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

__all__ = ["ExpertLayout", "LayoutError"]


class LayoutError(ValueError):
    """An expert layout's tensors disagree with each other or with its sizes."""


@dataclass(frozen=True)
class ExpertLayout:
    physical_to_logical: torch.Tensor
    """[L, R*S] int64: logical expert in each physical slot, -1 = empty."""
    logical_to_physical: torch.Tensor
    """[L, E, K] int64: replica slots of each logical expert, ascending, -1 padded."""
    replica_count: torch.Tensor
    """[L, E] int64: replicas per logical expert."""
    num_ranks: int
    """R: EP ranks."""
    slots_per_rank: int
    """S: physical expert slots on each rank."""

    def __post_init__(self) -> None:
        p2l, l2p, cnt = self.physical_to_logical, self.logical_to_physical, self.replica_count
        R, S = self.num_ranks, self.slots_per_rank
        if R < 1 or S < 1:
            raise LayoutError(f"num_ranks ({R}) and slots_per_rank ({S}) must be >= 1")
        for name, t, dim in (("physical_to_logical", p2l, 2), ("logical_to_physical", l2p, 3),
                             ("replica_count", cnt, 2)):
            if t.dim() != dim or t.dtype != torch.int64:
                raise LayoutError(f"{name} must be a {dim}-d int64 tensor, got "
                                  f"{tuple(t.shape)} {t.dtype}")
        L, P = p2l.shape
        if P != R * S:
            raise LayoutError(f"physical_to_logical has {P} slots, expected R*S = {R}*{S} = {R * S}")
        if l2p.shape[0] != L or cnt.shape != l2p.shape[:2]:
            raise LayoutError(f"shape mismatch: physical_to_logical {tuple(p2l.shape)}, "
                              f"logical_to_physical {tuple(l2p.shape)}, replica_count {tuple(cnt.shape)}")
        E = l2p.shape[1]
        if p2l.numel() and (p2l.min() < -1 or p2l.max() >= E):
            raise LayoutError(f"physical_to_logical holds ids outside [-1, {E})")
        # The two directions must describe the same placement.
        expected_l2p, expected_cnt = _invert(p2l, E, l2p.shape[2])
        if not torch.equal(expected_cnt, cnt):
            raise LayoutError("replica_count disagrees with physical_to_logical")
        if not torch.equal(expected_l2p, l2p):
            raise LayoutError("logical_to_physical disagrees with physical_to_logical")

    # ------------------------------------------------------------------ sizes
    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logical_to_physical.shape[1]

    @property
    def num_slots(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def max_replicas(self) -> int:
        return self.logical_to_physical.shape[2]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mapping(cls, physical_to_logical: torch.Tensor | list, *, num_ranks: int,
                     num_experts: int, max_replicas: int | None = None) -> "ExpertLayout":
        """Build from the slot -> expert map ``[L, R*S]`` (-1 = empty).

        ``max_replicas`` fixes the width K of ``logical_to_physical`` (default: the largest
        replica count present); keep it constant across layouts that share a routing table.
        """
        p2l = torch.as_tensor(physical_to_logical, dtype=torch.int64).clone()
        if p2l.dim() == 1:
            p2l = p2l.unsqueeze(0)
        if p2l.dim() != 2:
            raise LayoutError(f"physical_to_logical must be [L, R*S], got shape {tuple(p2l.shape)}")
        if p2l.shape[1] % num_ranks:
            raise LayoutError(f"physical_to_logical has {p2l.shape[1]} slots, not a multiple of "
                              f"num_ranks ({num_ranks})")
        if p2l.numel() and (p2l.min() < -1 or p2l.max() >= num_experts):
            raise LayoutError(f"physical_to_logical holds ids outside [-1, {num_experts})")
        counts = _counts(p2l, num_experts)
        need = int(counts.max()) if counts.numel() else 1
        k = max(need, 1) if max_replicas is None else max_replicas
        if k < need:
            raise LayoutError(f"max_replicas ({k}) is below the largest replica count ({need})")
        l2p, cnt = _invert(p2l, num_experts, k)
        return cls(p2l, l2p, cnt, num_ranks, p2l.shape[1] // num_ranks)

    @classmethod
    def trivial(cls, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int,
                *, max_replicas: int | None = None) -> "ExpertLayout":
        """Slot ``p`` holds expert ``p % E`` in every layer (vLLM's initial layout): experts
        are spread in contiguous blocks over the ranks; redundant slots repeat from expert 0."""
        P = num_ranks * slots_per_rank
        if num_experts > P:
            raise LayoutError(f"num_experts ({num_experts}) exceeds the physical slots "
                              f"R*S = {num_ranks}*{slots_per_rank} = {P}")
        row = torch.arange(P, dtype=torch.int64) % num_experts
        return cls.from_mapping(row.expand(num_layers, P).clone(), num_ranks=num_ranks,
                                num_experts=num_experts, max_replicas=max_replicas)

    # ------------------------------------------------------------------ queries
    def rank_of_slot(self, slot: int | torch.Tensor):
        return slot // self.slots_per_rank

    def slots_of_rank(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def experts_on_rank(self, layer: int, rank: int) -> list[int]:
        """Logical experts in ``rank``'s slots of ``layer`` (-1 for empty slots)."""
        s = self.slots_per_rank
        return self.physical_to_logical[layer, rank * s:(rank + 1) * s].tolist()

    def replica_ranks(self, layer: int, expert: int) -> list[int]:
        n = int(self.replica_count[layer, expert])
        return (self.logical_to_physical[layer, expert, :n] // self.slots_per_rank).tolist()

    def slot_ranks(self) -> torch.Tensor:
        """[R*S] rank owning each slot."""
        return torch.arange(self.num_slots) // self.slots_per_rank

    def live_replica_count(self, live_ranks: torch.Tensor | Iterable[int]) -> torch.Tensor:
        """[L, E] replicas on live ranks. ``live_ranks``: bool mask [R] or rank ids."""
        mask = _rank_mask(live_ranks, self.num_ranks)
        slot_live = mask[self.slot_ranks()]  # [P]
        p2l = self.physical_to_logical
        held = (p2l >= 0) & slot_live.unsqueeze(0)  # [L, P]
        out = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        out.scatter_add_(1, p2l.clamp(min=0), held.to(torch.int64))
        return out

    def uncovered(self, live_ranks: torch.Tensor | Iterable[int]) -> list[tuple[int, int]]:
        """(layer, expert) pairs with no replica on a live rank."""
        live = self.live_replica_count(live_ranks)
        return [tuple(x) for x in (live == 0).nonzero().tolist()]

    def rank_load(self, load: torch.Tensor) -> torch.Tensor:
        """[L, R] expected load of each rank when each expert's load ``load [L, E]`` is split
        evenly over its replicas."""
        load = torch.as_tensor(load, dtype=torch.float64)
        if load.shape != (self.num_layers, self.num_experts):
            raise LayoutError(f"load must be [L, E] = [{self.num_layers}, {self.num_experts}], "
                              f"got {tuple(load.shape)}")
        per_replica = load / self.replica_count.clamp(min=1).to(torch.float64)  # [L, E]
        p2l = self.physical_to_logical
        slot_load = torch.where(p2l >= 0, per_replica.gather(1, p2l.clamp(min=0)),
                                torch.zeros((), dtype=torch.float64))  # [L, P]
        return slot_load.view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(-1)

    def with_max_replicas(self, k: int) -> "ExpertLayout":
        """The same placement with ``logical_to_physical`` padded to width ``k``."""
        return ExpertLayout.from_mapping(self.physical_to_logical, num_ranks=self.num_ranks,
                                         num_experts=self.num_experts, max_replicas=k)


def _rank_mask(live_ranks, num_ranks: int) -> torch.Tensor:
    t = torch.as_tensor(list(live_ranks) if not isinstance(live_ranks, torch.Tensor) else live_ranks)
    if t.dtype == torch.bool:
        if t.shape != (num_ranks,):
            raise LayoutError(f"live mask must have shape [{num_ranks}], got {tuple(t.shape)}")
        return t.cpu()
    mask = torch.zeros(num_ranks, dtype=torch.bool)
    if t.numel():
        mask[t.to(torch.int64).cpu()] = True
    return mask


def _counts(p2l: torch.Tensor, num_experts: int) -> torch.Tensor:
    L = p2l.shape[0]
    out = torch.zeros(L, num_experts, dtype=torch.int64)
    out.scatter_add_(1, p2l.clamp(min=0), (p2l >= 0).to(torch.int64))
    return out


def _invert(p2l: torch.Tensor, num_experts: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logical_to_physical [L, E, k] and replica_count [L, E] from physical_to_logical [L, P]."""
    L, P = p2l.shape
    counts = _counts(p2l, num_experts)
    l2p = torch.full((L, num_experts, max(k, 1)), -1, dtype=torch.int64)
    if counts.numel() and int(counts.max()) > k:
        raise LayoutError(f"an expert has {int(counts.max())} replicas, above max_replicas ({k})")
    # Stable sort of slots by expert id: slots of one expert come out ascending.
    key = torch.where(p2l >= 0, p2l, torch.full_like(p2l, num_experts))
    order = torch.sort(key, dim=1, stable=True).indices  # [L, P] slots grouped by expert
    sorted_e = key.gather(1, order)
    starts = torch.cumsum(counts, dim=1) - counts  # [L, E] first position of each expert
    valid = sorted_e < num_experts
    pos = torch.arange(P).expand(L, P)
    rank_in_expert = pos - starts.gather(1, sorted_e.clamp(max=num_experts - 1))
    li = torch.arange(L).unsqueeze(1).expand(L, P)
    l2p[li[valid], sorted_e[valid], rank_in_expert[valid]] = order[valid]
    return l2p, counts
