"""Failure detection: crashes from the transport, hangs from heartbeats.

Engine-agnostic bookkeeping; whoever owns the sockets feeds it events:

- ``disconnected(rank)``: the transport saw the rank's connection drop (a ZeroMQ socket monitor,
  Ray reporting an actor dead, ...). A crash is declared at once when
  ``detector.crash_detection`` is on.
- ``heartbeat(rank, now)``: a heartbeat arrived.
- ``poll(now)``: ranks silent for longer than ``detector.heartbeat_timeout_ms`` are declared hung.

Measured on the CPU machines here: a SIGKILLed ZeroMQ peer is seen in 2-15 ms idle (34 ms
median with every core busy); a SIGSTOPped one after the timeout (150 ms by default with 50 ms
heartbeats). Each rank is reported once; ``reset(rank)`` re-arms it when it rejoins.

Two guards against declaring healthy ranks hung when it is the watcher that stalled (an
overloaded machine can deschedule the watching process for longer than the timeout):
- a ``poll`` that comes more than half a timeout after the previous one declares nothing and
  shifts every deadline by the gap (the silence may be ours);
- ranks are declared hung only while some watched rank is still heard from: when every rank
  goes silent at once, the detector waits ``ALL_SILENT_FACTOR`` timeouts before believing it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from ..config import DetectorConfig

__all__ = ["Suspicion", "FailureDetector", "ALL_SILENT_FACTOR"]

ALL_SILENT_FACTOR = 10
"""When every watched rank is silent, declare them hung only after this many timeouts."""


@dataclass(frozen=True)
class Suspicion:
    rank: int
    kind: str          # "crash" | "hang"
    at: float          # monotonic time it was declared
    silent_s: float = 0.0


class FailureDetector:
    def __init__(self, ranks: Iterable[int], config: DetectorConfig | None = None,
                 now: float | None = None):
        self.config = config or DetectorConfig()
        t = time.monotonic() if now is None else now
        self._last: dict[int, float] = {r: t for r in ranks}
        self._reported: set[int] = set()
        self._pending: list[Suspicion] = []
        self._last_poll = t

    @property
    def timeout_s(self) -> float:
        return self.config.heartbeat_timeout_ms / 1000.0

    def heartbeat(self, rank: int, now: float | None = None) -> None:
        if rank in self._last:
            self._last[rank] = time.monotonic() if now is None else now

    def disconnected(self, rank: int, now: float | None = None) -> None:
        if not self.config.crash_detection or rank in self._reported or rank not in self._last:
            return
        self._reported.add(rank)
        self._pending.append(Suspicion(rank, "crash", time.monotonic() if now is None else now))

    def poll(self, now: float | None = None) -> list[Suspicion]:
        """Crashes reported since the last poll, then ranks newly past the heartbeat timeout."""
        t = time.monotonic() if now is None else now
        out, self._pending = self._pending, []
        gap = t - self._last_poll
        self._last_poll = t
        if gap > self.timeout_s / 2:
            # We were not running: the silence we would see is (partly) our own.
            for r in self._last:
                self._last[r] += gap
            return out
        watched = {r: last for r, last in self._last.items() if r not in self._reported}
        if not watched:
            return out
        silent = {r: t - last for r, last in watched.items() if t - last > self.timeout_s}
        if len(silent) == len(watched) and min(silent.values()) <= self.timeout_s * ALL_SILENT_FACTOR:
            return out  # everyone silent at once: more likely the machine than every rank
        for r, quiet in silent.items():
            self._reported.add(r)
            out.append(Suspicion(r, "hang", t, quiet))
        return out

    def forget(self, rank: int) -> None:
        """Stop watching a rank (it is out for good)."""
        self._reported.add(rank)

    def reset(self, rank: int, now: float | None = None) -> None:
        """Watch a (re)joining rank afresh."""
        self._reported.discard(rank)
        self._last[rank] = time.monotonic() if now is None else now

    # The lifecycle every I/O part of the core shares; the detector owns no I/O itself.
    def configure(self, epoch: int, members: Iterable[int], now: float | None = None) -> None:
        members = set(members)
        for r in list(self._last):
            if r not in members:
                self.forget(r)
        for r in members:
            if r not in self._last or r in self._reported:
                self.reset(r, now)

    def abort(self) -> None:
        self._pending.clear()

    def errored(self) -> Exception | None:
        return None

    def shutdown(self) -> None:
        self._last.clear()
        self._pending.clear()
