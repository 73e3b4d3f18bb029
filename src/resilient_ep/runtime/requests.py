"""One request of the reference runtime as its client sees it: :class:`RequestRecord`, the
prompt, the tokens streamed so far and where the request runs, with the event queue a client
waits on (``wait``) or reads tokens from as they arrive (``stream``)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["RequestRecord"]


@dataclass
class RequestRecord:
    rid: str
    prompt: list[int]
    max_tokens: int
    eos: int | None
    owner: int = -1
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    degraded: bool = False
    migrations: int = 0
    owners: list[int] = field(default_factory=list)
    """The ranks it ran on before ``owner`` (each lost while it was in flight)."""
    submitted_at: float = 0.0
    finished_at: float = 0.0
    events: "queue.Queue" = field(default_factory=queue.Queue, repr=False)
    on_event: "Callable[[str, object], None] | None" = field(default=None, repr=False)
    """Called with each event as it is queued (``("token", id)``, ``("done", error)``), from
    the coordinator's thread: an asyncio server hands it to its loop."""

    def wait(self, timeout: float) -> "RequestRecord":
        """Block until finished (or raise TimeoutError)."""
        end = time.monotonic() + timeout
        while not self.finished:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {self.rid} not finished within {timeout} s "
                                   f"({len(self.generated)}/{self.max_tokens} tokens)")
            try:
                self.events.get(timeout=min(left, 0.1))
            except queue.Empty:
                pass
        return self

    def stream(self, timeout: float):
        """Yield tokens as they arrive; ends when the request finishes."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {self.rid}: stream timed out after {timeout} s")
            try:
                kind, value = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if kind == "token":
                yield value
            elif kind == "done":
                return

    def add_token(self, tok: int) -> None:
        """A token came from the rank that owns the request: record it and stream it."""
        self.generated.append(tok)
        self._event("token", tok)

    def finish(self, error: str | None = None) -> None:
        """The request is done (``error`` None: it completed); ends its stream."""
        self.error = error
        self.finished = True
        self.finished_at = time.time()
        self._event("done", error)

    def _event(self, kind: str, value) -> None:
        self.events.put((kind, value))
        if self.on_event is not None:
            self.on_event(kind, value)
