"""Receive loops that do not die: :func:`run_restarting`.

Every background receive loop of the project (the liveness monitor, a membership
subscriber, a KV peer store server) already drops a malformed message instead of raising.
Should one raise anyway (a bug, a socket error), the loop is started again, with its sockets
made afresh, after a short pause, and the restart is counted; only a loop that keeps failing
(``max_restarts`` in a row within ``window_s``) is given up, and the host sees its error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["run_restarting", "ReceiveLoop"]

log = logging.getLogger(__name__)


def run_restarting(body: Callable[[], None], *, name: str, stop: threading.Event,
                   on_restart: Callable[[BaseException], None], max_restarts: int = 10,
                   window_s: float = 10.0, pause_s: float = 0.05) -> BaseException | None:
    """Run ``body()`` until it returns or ``stop`` is set; restart it when it raises. Returns
    None, or the last error once the loop is given up."""
    failures: list[float] = []
    while True:
        try:
            body()
            return None
        except Exception as e:  # counted, restarted: no receive loop may end on one error
            if stop.is_set():
                return None
            now = time.monotonic()
            failures = [t for t in failures if now - t < window_s] + [now]
            if len(failures) > max_restarts:
                log.exception("resilient-ep: %s failed %d times in %.0f s; giving up", name,
                              len(failures), window_s)
                return e
            log.warning("resilient-ep: %s failed (%r); restarting it", name, e)
            on_restart(e)
            if stop.wait(pause_s):
                return None


class ReceiveLoop:
    """A receive loop in a thread of its own, run by :func:`run_restarting`: subclasses
    define ``_serve()`` (make the sockets, serve until ``self._stop`` is set, close them) and
    count what they drop in ``dropped``. ``restarts`` counts the loop's restarts; ``error``
    is the last error once it was given up."""

    loop_name = "receive loop"
    max_restarts = 10

    def __init__(self, thread_name: str):
        from collections import Counter

        self.dropped: Counter[str] = Counter()
        self.restarts = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=thread_name)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        self.error = run_restarting(self._serve, name=self.loop_name, stop=self._stop,
                                    on_restart=self._restarted,
                                    max_restarts=self.max_restarts)

    def _restarted(self, _e: BaseException) -> None:
        self.restarts += 1

    def _serve(self) -> None:
        raise NotImplementedError
