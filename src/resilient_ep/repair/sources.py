"""Where one weight copy can be read from, cheapest first.

``repair.sources`` orders the kinds; for one copy (an expert into a slot of ``target``):

- ``shadow``: ``target`` itself holds the expert in another slot (a shadow, or a copy the
  routing width leaves unrouted): a local memory copy;
- ``peer``: a live rank holding the expert (closest first: same node, then by rank id);
- ``host``: the node's host-memory backup holds it;
- ``remote``: another node's host backup (multi-node; not on one host);
- ``disk``: the model's weight files.

Kinds with nothing to offer for this copy are left out; the executor tries the rest in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from ..layout import ExpertLayout

__all__ = ["Candidate", "candidates"]


@dataclass(frozen=True)
class Candidate:
    kind: str
    """``shadow``, ``peer``, ``host``, ``remote`` or ``disk``."""
    rank: int | None = None
    """The rank to read from (``shadow``: the target; ``peer``: the holder)."""
    slot: int | None = None
    """Its physical slot holding the expert (``shadow``, ``peer``)."""


def candidates(physical: ExpertLayout, layer: int, expert: int, target: int, *,
               live_ranks: Iterable[int], sources: Sequence[str],
               host_has: Callable[[int, int], bool] | None = None, disk: bool = True,
               ranks_per_node: int | None = None, exclude_slots: Iterable[int] = ()
               ) -> list[Candidate]:
    """Sources able to serve ``expert`` of ``layer`` to ``target``, in ``sources`` order.
    ``physical``: what every slot holds now; ``host_has(layer, expert)``: the local node's
    backup holds it; ``exclude_slots``: slots whose content is in flux (being overwritten)."""
    live = set(live_ranks)
    skip = set(exclude_slots)
    row = physical.physical_to_logical[layer].tolist()
    S = physical.slots_per_rank
    holders = [(slot // S, slot) for slot, e in enumerate(row)
               if e == expert and slot not in skip and slot // S in live]
    node = (lambda r: r // ranks_per_node) if ranks_per_node else (lambda r: 0)
    out: list[Candidate] = []
    for kind in sources:
        if kind == "shadow":
            out += [Candidate("shadow", r, s) for r, s in holders if r == target]
        elif kind == "peer":
            peers = sorted(((r, s) for r, s in holders if r != target),
                           key=lambda rs: (node(rs[0]) != node(target), rs[0]))
            out += [Candidate("peer", r, s) for r, s in peers]
        elif kind == "host":
            if host_has is not None and host_has(layer, expert):
                out.append(Candidate("host"))
        elif kind == "disk":
            if disk:
                out.append(Candidate("disk"))
        # "remote": another node's backup, reached over the network (multi-node only).
    return out
