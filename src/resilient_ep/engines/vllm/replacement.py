"""Whether this process is a replacement rank (``rejoin.py`` starts one for a lost DP rank;
``joining.py`` is what it does differently)."""

from __future__ import annotations

import os

from resilient_ep.liveness import RankJoin

__all__ = ["REJOIN_ENV", "EXPERTS_ENV", "is_replacement", "rank_live_at"]

REJOIN_ENV = "RESILIENT_EP_REJOIN"
"""Set (to the lost DP rank) in the environment of a replacement engine core and its workers."""

EXPERTS_ENV = "RESILIENT_EP_REJOIN_EXPERTS"
"""Set, for a replacement, to the directory where the survivors exported the experts it will
hold from their memory (a :class:`~resilient_ep.repair.HostBackup` on the node's shared
memory): its ``peer`` weight source."""


def is_replacement() -> bool:
    return os.environ.get(REJOIN_ENV) is not None


def rank_live_at(events, rank: int, epoch: int) -> bool:
    """Whether ``rank`` was live right after the event of ``epoch`` in the authority's log
    ``events`` (losses and joins in order; every rank is live at the start). A replacement
    replays the whole log when it subscribes: the joins of other ranks before its own are
    history to it, not joins it takes part in."""
    live = True
    for e in events:
        if e.epoch > epoch:
            break
        if int(e.rank) == int(rank):
            live = isinstance(e, RankJoin)
    return live
