"""The liveness wire format and its senders.

Two messages travel to an instance's liveness socket (a ZeroMQ PULL bound by the
:class:`~.monitor.LivenessMonitor`), each one short ASCII frame:

- ``b"<rank> <pid>"``: rank ``rank`` is alive (its :class:`Beacon`, every
  ``detector.heartbeat_interval_ms``);
- ``b"dead <rank> <reporter>"``: a collective group of the instance (a
  :class:`~resilient_ep.transport.group.LiveGroup`) lost rank ``rank``, as seen by member
  ``reporter`` (:class:`LossReporter`).

Anything else is malformed: :func:`parse_beacon` returns None and the monitor drops it.
"""

from __future__ import annotations

import os
import threading

import zmq

__all__ = ["Beacon", "LossReporter", "parse_beacon"]


def parse_beacon(msg: bytes) -> tuple[str, int, int] | None:
    """``("alive", rank, pid)`` or ``("dead", rank, reporter)``; None when malformed."""
    try:
        parts = msg.split()
        if len(parts) == 2:
            kind, rank, other = "alive", int(parts[0]), int(parts[1])
        elif len(parts) == 3 and parts[0] == b"dead":
            kind, rank, other = "dead", int(parts[1]), int(parts[2])
        else:
            return None
    except (ValueError, AttributeError):
        return None
    return (kind, rank, other) if rank >= 0 else None


class Beacon:
    """A thread that tells ``endpoint`` every ``interval_s`` that ``rank`` is alive."""

    def __init__(self, endpoint: str, rank: int, interval_s: float):
        self.endpoint, self.rank, self.interval_s = endpoint, rank, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"resilient-ep-beacon-{rank}")
        self._thread.start()

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(self.endpoint)
        msg = f"{self.rank} {os.getpid()}".encode()
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    sock.send(msg, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
        except zmq.ZMQError:  # context terminated at exit
            pass
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()


class LossReporter:
    """A :class:`~resilient_ep.transport.group.LiveGroup` listener (``fn(dead, epoch)``) that
    reports every rank the group lost to the instance's liveness socket, once each."""

    def __init__(self, endpoint: str, reporter: int):
        self.endpoint = endpoint
        self.reporter = reporter
        self._sock: zmq.Socket | None = None
        self._sent: set[int] = set()

    def __call__(self, dead, epoch: int) -> None:
        if self._sock is None:
            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 1000)
            self._sock.setsockopt(zmq.SNDHWM, 100)
            self._sock.connect(self.endpoint)
        for rank in sorted(set(dead) - self._sent):
            try:
                self._sock.send(f"dead {rank} {self.reporter}".encode(), flags=zmq.NOBLOCK)
                self._sent.add(rank)
            except zmq.ZMQError:
                pass
