"""What weight repairs did, per source: the numbers ``/resilience/status`` shows."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

__all__ = ["RepairProgress"]


class RepairProgress:
    """Thread-safe counters of one process's repairs (an engine rank's executor)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_source: dict[str, dict[str, float]] = defaultdict(
            lambda: {"copies": 0, "bytes": 0, "seconds": 0.0, "failures": 0})
        self.pending: dict[tuple[int, int], float] = {}
        """(slot, expert) -> when its copy was planned (monotonic)."""
        self.done: list[dict[str, Any]] = []
        """Finished copies (recent first out): slot, expert, source, seconds since planned."""

    def planned(self, slot: int, expert: int) -> None:
        with self._lock:
            self.pending[(slot, expert)] = time.monotonic()

    def copied(self, slot: int, expert: int, source: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            s = self.by_source[source]
            s["copies"] += 1
            s["bytes"] += nbytes
            s["seconds"] += seconds
            t0 = self.pending.pop((slot, expert), None)
            now = time.monotonic()
            self.done.append({"slot": slot, "expert": expert, "source": source,
                              "bytes": nbytes, "copy_s": seconds, "planned_monotonic": t0,
                              "finished_monotonic": now,
                              "since_planned_s": None if t0 is None else now - t0})
            del self.done[:-1000]

    def failed(self, source: str) -> None:
        with self._lock:
            self.by_source[source]["failures"] += 1

    def abandoned(self, slot: int, expert: int) -> None:
        with self._lock:
            self.pending.pop((slot, expert), None)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            by = {}
            for k, v in self.by_source.items():
                mib_s = (v["bytes"] / 2**20 / v["seconds"]) if v["seconds"] > 0 else None
                by[k] = {**v, "mib_per_s": mib_s}
            return {"by_source": by,
                    "pending": [[s, e] for (s, e) in sorted(self.pending)],
                    "done": list(self.done[-50:])}
