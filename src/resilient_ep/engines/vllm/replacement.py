"""Whether this process is a replacement rank (``rejoin.py`` starts one for a lost DP rank;
``joining.py`` is what it does differently)."""

from __future__ import annotations

import os

from resilient_ep.liveness import RankJoin

__all__ = ["REJOIN_ENV", "EXPERTS_ENV", "SINCE_ENV", "is_replacement", "started_after",
           "own_join_epoch", "takes_part"]

REJOIN_ENV = "RESILIENT_EP_REJOIN"
"""Set (to the lost DP rank) in the environment of a replacement engine core and its workers."""

EXPERTS_ENV = "RESILIENT_EP_REJOIN_EXPERTS"
"""Set, for a replacement, to the directory where the survivors exported the experts it will
hold from their memory (a :class:`~resilient_ep.repair.HostBackup` on the node's shared
memory): its ``peer`` weight source."""


SINCE_ENV = "RESILIENT_EP_REJOIN_SINCE"
"""Set, for a replacement, to the membership epoch when it was started: its own join comes
later (a join of its rank up to that epoch was a predecessor's)."""


def is_replacement() -> bool:
    return os.environ.get(REJOIN_ENV) is not None


def started_after() -> int:
    """The epoch a replacement was started at (:data:`SINCE_ENV`; 0 when not set)."""
    try:
        return int(os.environ.get(SINCE_ENV) or 0)
    except ValueError:
        return 0


def own_join_epoch(events, rank: int) -> int | None:
    """The epoch of the newest join of ``rank`` in the authority's log ``events`` when no loss
    of it came after (None: the rank is out, or never left)."""
    own = None
    for e in events:
        if int(e.rank) == int(rank):
            own = int(e.epoch) if isinstance(e, RankJoin) else None
    return own


def takes_part(events, rank: int, epoch: int, replacement: bool | None = None,
               since: int | None = None) -> bool:
    """Whether this process takes part in the join of ``epoch``. A process that never left
    takes part in every join. A replacement replays the whole log when it subscribes: every
    join before its own is history to it (the process it replaces was there, not it), its
    own join and the later ones are its to take part in. Its own join comes after ``since``
    (the epoch it was started at, :func:`started_after`): while its subscriber is still
    replaying the log, a predecessor's join of the same rank whose loss is not applied yet
    looks like the newest join of the rank, and is not its own (found in a local chaos run:
    a second replacement of DP2 flipped to its predecessor's join and hung in the hello)."""
    if not (is_replacement() if replacement is None else replacement):
        return True
    own = own_join_epoch(events, rank)
    since = started_after() if since is None else since
    return own is not None and own > since and int(epoch) >= own
