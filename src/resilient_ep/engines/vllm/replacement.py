"""Whether this process is a replacement rank (``rejoin.py`` starts one for a lost DP rank;
``joining.py`` is what it does differently)."""

from __future__ import annotations

import os

from resilient_ep.liveness import RankJoin

__all__ = ["REJOIN_ENV", "EXPERTS_ENV", "is_replacement", "own_join_epoch", "takes_part"]

REJOIN_ENV = "RESILIENT_EP_REJOIN"
"""Set (to the lost DP rank) in the environment of a replacement engine core and its workers."""

EXPERTS_ENV = "RESILIENT_EP_REJOIN_EXPERTS"
"""Set, for a replacement, to the directory where the survivors exported the experts it will
hold from their memory (a :class:`~resilient_ep.repair.HostBackup` on the node's shared
memory): its ``peer`` weight source."""


def is_replacement() -> bool:
    return os.environ.get(REJOIN_ENV) is not None


def own_join_epoch(events, rank: int) -> int | None:
    """The epoch of the newest join of ``rank`` in the authority's log ``events`` when no loss
    of it came after (None: the rank is out, or never left)."""
    own = None
    for e in events:
        if int(e.rank) == int(rank):
            own = int(e.epoch) if isinstance(e, RankJoin) else None
    return own


def takes_part(events, rank: int, epoch: int, replacement: bool | None = None) -> bool:
    """Whether this process takes part in the join of ``epoch``. A process that never left
    takes part in every join. A replacement replays the whole log when it subscribes: every
    join before its own is history to it (the process it replaces was there, not it), its
    own join and the later ones are its to take part in."""
    if not (is_replacement() if replacement is None else replacement):
        return True
    own = own_join_epoch(events, rank)
    return own is not None and int(epoch) >= own
