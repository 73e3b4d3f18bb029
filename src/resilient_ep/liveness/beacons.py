"""The liveness wire format and its senders.

Two messages travel to an instance's liveness socket (a ZeroMQ PULL bound by the
:class:`~.monitor.LivenessMonitor`), each one frame of the project's wire format
(:mod:`resilient_ep.transport.wire`, no tensors):

- ``{"t": "alive", "rank": r, "pid": p}``: rank ``r`` is alive (its :class:`Beacon`, every
  ``detector.heartbeat_interval_ms``);
- ``{"t": "dead", "rank": r, "reporter": q}``: a collective group of the instance (a
  :class:`~resilient_ep.transport.group.LiveGroup`) lost rank ``r``, as seen by member ``q``
  (:class:`LossReporter`).

Anything else is malformed: :func:`parse_beacon` returns None and the monitor drops it.
"""

from __future__ import annotations

import os
import threading

import zmq

from ..transport import curve, wire

__all__ = ["Beacon", "LossReporter", "parse_beacon", "read_beacon", "alive_message", "dead_message"]


def alive_message(rank: int, pid: int, **key) -> bytes:
    """``key``: as :func:`~resilient_ep.transport.wire.encode_header` (default: this
    process's key)."""
    return wire.encode_header({"t": "alive", "rank": int(rank), "pid": int(pid)}, **key)


def dead_message(rank: int, reporter: int, **key) -> bytes:
    return wire.encode_header({"t": "dead", "rank": int(rank), "reporter": int(reporter)},
                              **key)


def parse_beacon(msg: bytes, **key) -> tuple[str, int, int] | None:
    """``("alive", rank, pid)`` or ``("dead", rank, reporter)``; None when malformed or not
    from this instance (``key``: as :func:`~resilient_ep.transport.wire.decode_header`)."""
    try:
        return read_beacon(msg, **key)
    except wire.WireError:
        return None


def read_beacon(msg: bytes, **key) -> tuple[str, int, int]:
    """As :func:`parse_beacon`, but a message that is not a beacon raises
    :class:`~resilient_ep.transport.wire.WireError` with the reason."""
    try:
        h = wire.decode_header(msg, **key)
    except TypeError:
        raise wire.WireError("header", "not bytes") from None
    kind = h.get("t")
    other = h.get("pid") if kind == "alive" else h.get("reporter") if kind == "dead" else None
    rank = h.get("rank")
    if type(rank) is not int or type(other) is not int or rank < 0:
        raise wire.WireError("fields", "not a beacon")
    return kind, rank, other


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
        sock = curve.client(ctx.socket(zmq.PUSH))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(self.endpoint)
        msg = alive_message(self.rank, os.getpid())
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
    reports every rank the group lost to the instance's liveness socket, once each
    (``known_dead``: ranks out before the group was made, nobody's news)."""

    def __init__(self, endpoint: str, reporter: int, known_dead=()):
        self.endpoint = endpoint
        self.reporter = reporter
        self._sock: zmq.Socket | None = None
        self._sent: set[int] = set(int(r) for r in known_dead)

    def __call__(self, dead, epoch: int) -> None:
        if self._sock is None:
            self._sock = curve.client(zmq.Context.instance().socket(zmq.PUSH))
            self._sock.setsockopt(zmq.LINGER, 1000)
            self._sock.setsockopt(zmq.SNDHWM, 100)
            self._sock.connect(self.endpoint)
        for rank in sorted(set(dead) - self._sent):
            try:
                self._sock.send(dead_message(rank, self.reporter), flags=zmq.NOBLOCK)
                self._sent.add(rank)
            except zmq.ZMQError:
                pass
