"""A watch on an asyncio event loop: when the loop has run no callback for ``stall_s``, the
stack of the loop's thread is logged once (and the stall's length when it ends).

Why: an API server serves every HTTP connection it accepted from one event loop; a loop
stuck for a second stalls each of those requests, and the stack names the code that held it.

Cost: one callback on the loop every ``tick_s`` and one thread that wakes as often.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

__all__ = ["LoopWatch"]

log = logging.getLogger(__name__)


class LoopWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, name: str, stall_s: float = 1.0,
                 tick_s: float = 0.1, logger: logging.Logger | None = None):
        if not stall_s > tick_s > 0:
            raise ValueError(f"stall_s must exceed tick_s > 0, got stall_s={stall_s}, "
                             f"tick_s={tick_s}")
        self.loop, self.name = loop, name
        self.log = logger or log
        self.stall_s, self.tick_s = float(stall_s), float(tick_s)
        self.last_tick = time.monotonic()
        self.loop_thread: int | None = None
        self.stalls: list[dict] = []
        """Each stall seen: ``{"at": monotonic start, "s": length, "stack": [...]}``."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name=f"resilient-ep-loop-watch-{name}")

    def start(self) -> "LoopWatch":
        self.loop.call_soon_threadsafe(self._tick)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _tick(self) -> None:
        self.loop_thread = threading.get_ident()
        self.last_tick = time.monotonic()
        if not self._stop.is_set() and not self.loop.is_closed():
            self.loop.call_later(self.tick_s, self._tick)

    def _watch(self) -> None:
        current: dict | None = None
        while not self._stop.wait(self.tick_s):
            if self.loop.is_closed():
                return
            now, last = time.monotonic(), self.last_tick
            quiet = now - last
            if current is None and quiet > self.stall_s and self.loop_thread is not None:
                frame = sys._current_frames().get(self.loop_thread)
                stack = traceback.format_stack(frame) if frame is not None else []
                current = {"at": last, "s": quiet, "stack": stack}
                self.log.warning("resilient-ep: %s event loop has run nothing for %.1f s; its "
                                 "thread is at:\n%s", self.name, quiet, "".join(stack[-12:]))
            elif current is not None and last > current["at"]:
                current["s"] = last - current["at"]
                self.stalls.append(current)
                self.log.warning("resilient-ep: %s event loop ran again after %.1f s",
                                 self.name, current["s"])
                current = None
