"""The decisions of an instance's membership authority, with no thread and no socket:
:class:`LivenessTracker`.

Its host feeds it what it observes and the tracker decides who is lost, fences what it must
and records each loss in the instance's :class:`~resilient_ep.membership.Membership`:

- ``beacon(msg)``: one frame of the liveness wire format (:mod:`.beacons`). An "alive" beacon
  feeds the :class:`~.detector.FailureDetector` (a rank is watched from its first beacon on,
  or from the start with ``watch``); a loss report ("a group lost rank r") fences rank r
  (cause ``reported``: a dead or frozen helper process of a rank whose main process runs on);
- ``exited(rank)``: the rank's process is gone (a process sentinel fired);
- ``disconnected(rank)``: a connection to the rank dropped (a socket monitor): a crash, as
  ``exited``, unless ``detector.crash_detection`` is off;
- ``poll()``: ranks silent for ``detector.heartbeat_timeout_ms`` are fenced (cause ``hang``).

Fencing calls the host's ``fence(rank, why)``. When the loss is recorded depends on what a
fence is for the host (``out_at_fence``):

- False (vLLM: a fence kills the rank's processes): the loss is recorded when the host reports
  the process gone (``exited``), with the cause of the fence;
- True (the reference runtime: a fence is a membership decision, the process may wake up and
  be taken back): the loss is recorded at once, the rank ``fenced``.

``remote`` ranks run on other hosts (several hosts): their processes are not the host's to
kill or to see exit, so their loss is recorded at the fence, as with ``out_at_fence``; they
stop by themselves (their lease ran out, or they read the fence in the membership).

Each call returns the :class:`RankLoss` es it recorded (one epoch bump for every rank lost in
that call) and hands each to the listeners. A rank taken back (``watch`` after a join) is
watched afresh.

Joins are decided by the host too (a replacement process loaded, warmed up and verified
itself): ``admit(rank)`` takes the rank back into the live set with one epoch bump and
records a :class:`RankJoin`. ``events`` is every loss and join in the order decided: what a
process that follows the authority replays.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import DetectorConfig
from ..membership import Membership, RankState
from ..transport import wire
from .beacons import read_beacon
from .detector import FailureDetector

__all__ = ["RankLoss", "RankJoin", "LivenessTracker"]

log = logging.getLogger(__name__)

_IN = (RankState.LIVE, RankState.JOINING)


@dataclass(frozen=True)
class RankLoss:
    """One rank lost: how (``exit``, ``hang``, ``reported``), its exit code, when it was
    detected (``time.monotonic()``, system-wide on Linux) and the epoch it started."""

    rank: int
    cause: str
    exitcode: int | None
    detected_monotonic: float
    epoch: int

    @property
    def kind(self) -> str:
        """The recovery policy's word for it: ``crash`` (the process is gone) or ``hang``."""
        return "crash" if self.cause == "exit" else "hang"


@dataclass(frozen=True)
class RankJoin:
    """One rank taken back into the live set (a replacement process, or a fenced rank that
    answers again): when (``time.monotonic()``) and the epoch it started."""

    rank: int
    joined_monotonic: float
    epoch: int

    kind = "join"


class LivenessTracker:
    def __init__(self, membership: Membership, ranks: Iterable[int], *,
                 detector: DetectorConfig | None = None,
                 fence: Callable[[int, str], None] | None = None, out_at_fence: bool = False,
                 key: bytes | None = None, remote: Iterable[int] = ()):
        self.membership = membership
        self.remote = frozenset(int(r) for r in remote)
        self.ranks = frozenset(int(r) for r in ranks) | self.remote
        self.detector = FailureDetector([], detector or DetectorConfig())
        self.out_at_fence = out_at_fence
        self._key = {"key": key} if key is not None else {}  # else this process's key
        self._fence = fence
        self._fenced: dict[int, str] = {}
        self._heard: set[int] = set()
        self.losses: list[RankLoss] = []
        self.events: list[RankLoss | RankJoin] = []
        """Every loss and join, in the order decided."""
        self._listeners: list[Callable[[RankLoss], None]] = []
        self._join_listeners: list[Callable[[RankJoin], None]] = []
        self.dropped: Counter[str] = Counter()
        """Malformed or foreign liveness messages, dropped, by reason."""

    def add_listener(self, fn: Callable[[RankLoss], None]) -> None:
        self._listeners.append(fn)

    def add_join_listener(self, fn: Callable[[RankJoin], None]) -> None:
        self._join_listeners.append(fn)

    def admit(self, rank: int, now: float | None = None) -> RankJoin | None:
        """Take ``rank`` back into the live set (it was out, or joining): one epoch bump,
        watched afresh from now on. None when it is live already."""
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is not a rank of this instance ({sorted(self.ranks)})")
        if self.membership.state(rank) is RankState.LIVE:
            return None
        view = self.membership.join([rank])
        now = time.monotonic() if now is None else now
        self.watch(rank, now)
        join = RankJoin(rank, now, view.epoch)
        self.events.append(join)
        _tell(self._join_listeners, join)
        return join

    def watch(self, rank: int, now: float | None = None) -> None:
        """Watch ``rank`` for silence from now on (at start, or when it has been taken back)."""
        self._fenced.pop(rank, None)
        self._heard.add(rank)
        self.detector.reset(rank, now)

    # ------------------------------------------------------------------ observations
    def beacon(self, msg: bytes, now: float | None = None) -> tuple[str, int, int] | None:
        """One liveness frame. Returns it parsed (``("alive", rank, pid)`` or ``("dead",
        rank, reporter)``) so the host can act on an alive rank it had given up on; None when
        dropped (malformed, or a rank not of this instance)."""
        try:
            got = read_beacon(msg, **self._key)
        except wire.WireError as e:
            self.dropped[e.reason] += 1
            return None
        if got[1] not in self.ranks:
            self.dropped["non_member"] += 1
            return None
        kind, rank, _ = got
        if kind == "dead":
            if self.membership.state(rank) is RankState.JOINING:
                # No group holds a joining rank (it joins them at its admission): a group's
                # report of it is about the process it replaces.
                self.dropped["joining"] += 1
                return got
            self.fence(rank, "reported", "was lost by its peers", now)
        else:
            self.alive(rank, now)
        return got

    def alive(self, rank: int, now: float | None = None) -> None:
        """Rank ``rank`` said it is alive through a channel its host checked itself (a
        heartbeat datagram, :mod:`.datagrams`), as an "alive" beacon does."""
        if rank in self.ranks and self.membership.state(rank) in _IN:
            if rank not in self._heard:  # watched from its first beacon on
                self._heard.add(rank)
                self.detector.reset(rank, now)
            self.detector.heartbeat(rank, now)

    def exited(self, rank: int, exitcode: int | None = None,
               now: float | None = None) -> list[RankLoss]:
        """``rank``'s process is gone."""
        self.detector.forget(rank)
        return self._lost([rank], self._fenced.get(rank, "exit"), exitcode, now)

    def disconnected(self, rank: int, now: float | None = None) -> None:
        """A connection to ``rank`` dropped; ``poll`` reports it (unless crash detection is
        off)."""
        self.detector.disconnected(rank, now)

    def poll(self, now: float | None = None) -> list[RankLoss]:
        """Dropped connections become crashes, silent ranks are fenced (``hang``)."""
        now = time.monotonic() if now is None else now
        crashed, out = [], []
        for s in self.detector.poll(now):
            if s.kind == "crash":
                crashed.append(s.rank)
            else:
                out += self.fence(s.rank, "hang", "stopped answering", now)
        if crashed:
            out += self._lost(crashed, "exit", None, now)
        return out

    def fence(self, rank: int, cause: str, why: str, now: float | None = None) -> list[RankLoss]:
        """Fence ``rank`` (once, while it is in): it must never serve again in this epoch."""
        if (rank not in self.ranks or rank in self._fenced
                or self.membership.state(rank) not in _IN):
            return []
        self._fenced[rank] = cause
        log.warning("resilient-ep: rank %d %s: fencing it", rank, why)
        if self._fence is not None and rank not in self.remote:
            self._fence(rank, why)
        if self.out_at_fence or rank in self.remote:
            return self._lost([rank], cause, None, now)
        return []

    # ------------------------------------------------------------------ records
    def _lost(self, ranks: list[int], cause: str, exitcode, now) -> list[RankLoss]:
        ranks = sorted({r for r in ranks if self.membership.state(r) in _IN})
        if not ranks:
            return []
        state = RankState.DEAD if cause == "exit" else RankState.FENCED
        view = self.membership.fail(ranks, state=state)
        detected = time.monotonic() if now is None else now
        out = [RankLoss(r, cause, exitcode, detected, view.epoch) for r in ranks]
        for r in ranks:
            self.detector.forget(r)
        self.losses += out
        self.events += out
        for loss in out:
            _tell(self._listeners, loss)
        return out


def _tell(listeners, event) -> None:
    for fn in listeners:
        try:
            fn(event)
        except Exception:  # one listener must not stop the authority
            log.exception("resilient-ep: a liveness listener failed")
