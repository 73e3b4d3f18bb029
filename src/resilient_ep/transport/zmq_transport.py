"""ZeroMQ data plane: every rank binds one inbox (PULL) and pushes to each peer's inbox.

Lifecycle (as every I/O part of the core): ``configure(epoch, members)`` sets the epoch and the
peers that messages may come from; ``abort()`` interrupts a blocked ``recv``; ``errored()``
returns the first transport error; ``shutdown()`` closes every socket. ``recv`` takes a deadline
and never blocks past it. Messages from an older epoch are kept (a surviving peer's expert
results stay valid across epochs) but messages from ranks outside ``members`` are dropped:
that is how a fenced rank's late messages are ignored. A message from a non-member made under
a *newer* epoch than ours (a rank admitted by a membership change we have not applied yet) is
held back and delivered once ``configure`` makes its sender a member.

Addresses: ``ipc://<dir>/data-<rank>`` (Unix sockets in a private directory) or
``tcp://127.0.0.1:<base_port + rank>``.
"""

from __future__ import annotations

from collections import Counter

import time
from typing import Iterable

import zmq

from . import curve, wire

__all__ = ["ZmqTransport", "data_endpoint"]


def data_endpoint(kind: str, where: str, rank: int) -> str:
    """``kind`` 'ipc': ``where`` is a directory; 'tcp': ``where`` is the base port."""
    if kind == "ipc":
        return f"ipc://{where}/data-{rank}"
    if kind == "tcp":
        return f"tcp://127.0.0.1:{int(where) + rank}"
    raise ValueError(f"transport.address must be 'ipc' or 'tcp', got {kind!r}")


class ZmqTransport:
    def __init__(self, rank: int, endpoints: list[str], *, ctx: zmq.Context | None = None):
        self.rank = rank
        self.endpoints = list(endpoints)
        self.ctx = ctx or zmq.Context.instance()
        self.dropped: Counter[str] = Counter()
        """Messages received and dropped, by reason (``wire.WireError.reason``, ``fields``)."""
        self.inbox = curve.server(self.ctx.socket(zmq.PULL))
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, 0)
        self.inbox.bind(self.endpoints[rank])
        self._out: dict[int, zmq.Socket] = {}
        for peer, ep in enumerate(self.endpoints):
            if peer == rank:
                continue
            s = curve.client(self.ctx.socket(zmq.PUSH))
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected
            s.connect(ep)
            self._out[peer] = s
        self._abort = self.ctx.socket(zmq.PAIR)
        self._abort_tx = self.ctx.socket(zmq.PAIR)
        addr = f"inproc://abort-{id(self)}"
        self._abort.bind(addr)
        self._abort_tx.connect(addr)
        self.epoch = 0
        self.members: frozenset[int] = frozenset(range(len(endpoints)))
        self._error: Exception | None = None
        self._early: list[tuple[dict, list]] = []   # from the future: held until configure
        self._released: list[tuple[dict, list]] = []

    # ------------------------------------------------------------------ lifecycle
    def configure(self, epoch: int, members: Iterable[int]) -> None:
        self.epoch = epoch
        self.members = frozenset(members)
        held, self._early = self._early, []
        for header, tensors in held:
            if header.get("src") in self.members:
                self._released.append((header, tensors))
            elif header.get("epoch", 0) > epoch:
                self._early.append((header, tensors))

    def abort(self) -> None:
        self._abort_tx.send(b"x")

    def errored(self) -> Exception | None:
        return self._error

    def shutdown(self) -> None:
        for s in (*self._out.values(), self.inbox, self._abort, self._abort_tx):
            s.close(linger=0)
        self._out.clear()

    # ------------------------------------------------------------------ data
    def send(self, dst: int, header: dict, tensors=()) -> bool:
        """Send without blocking; False when the peer is not connected (dead or not yet up)."""
        if dst not in self.members:
            return False
        frames = wire.encode(dict(header, epoch=self.epoch, src=self.rank), list(tensors))
        try:
            self._out[dst].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            self._error = e
            return False

    def wait_connected(self, peers: Iterable[int], deadline: float) -> list[int]:
        """Block until a send to each peer would not be refused; returns peers still missing."""
        missing = [p for p in peers if p != self.rank]
        while missing and time.monotonic() < deadline:
            still = []
            for p in missing:
                ev = self._out[p].poll(0, zmq.POLLOUT)
                if not ev:
                    still.append(p)
            missing = still
            if missing:
                time.sleep(0.005)
        return missing

    def has_released(self) -> bool:
        """True when held-back messages became deliverable (``recv_nowait`` returns them)."""
        return bool(self._released)

    def poll_sockets(self) -> list[zmq.Socket]:
        """Sockets a caller's poller should watch: the inbox and the abort pipe."""
        return [self.inbox, self._abort]

    def recv(self, deadline: float) -> tuple[dict, list] | None:
        """Next message from a member, or None at the deadline / on abort."""
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self._abort, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = dict(poller.poll(left * 1000))
            if self._abort in ready:
                self._abort.recv()
                return None
            if self.inbox in ready or self.has_released():
                msg = self.recv_nowait()
                if msg is not None:
                    return msg

    def recv_nowait(self) -> tuple[dict, list] | None:
        if self._released:
            return self._released.pop(0)
        try:
            frames = self.inbox.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        try:
            header, tensors = wire.decode(frames)
        except wire.WireError as e:
            self.dropped[e.reason] += 1
            return None
        if type(header.get("src")) is not int or not isinstance(header.get("t"), str) \
                or type(header.get("epoch", 0)) is not int:
            self.dropped["fields"] += 1
            return None
        if header.get("src") not in self.members:
            if header.get("epoch", 0) > self.epoch and len(self._early) < 10_000:
                self._early.append((header, tensors))  # we are behind: keep it for later
            else:  # a fenced or dead rank's late message, or a stranger's
                self.dropped["non_member"] += 1
            return None
        return header, tensors
