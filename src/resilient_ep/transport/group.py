"""A collective group that survives the death of a member.

Engines run small collectives between their data-parallel ranks on every step (vLLM: the
token-count all-reduce, the MoE all-gather and reduce-scatter, the "anyone busy?" sum). Over
gloo or NCCL a dead member makes each of them hang or raise, and the group cannot shrink.
:class:`LiveGroup` runs the same exchanges over ZeroMQ (``ZmqTransport``) among the members
still alive, with the core's :class:`~resilient_ep.detector.FailureDetector` deciding who is.

Detection, per member process, while it waits in a collective:
- crash: the socket monitor of the connection to a peer reports it dropped after it was up
  (a SIGKILLed process's sockets close at once);
- hang: heartbeats (a background thread, ``detector.heartbeat_interval_ms``) stop for
  ``detector.heartbeat_timeout_ms``; a peer is watched from its first message on;
- goodbye: a member tied to a parent process (``tied_to_parent``) tells its peers it is gone
  as soon as that parent dies;
- hearsay: every message carries its sender's dead set; a newer one is adopted (all members
  converge on the same view even when only one of them saw the failure).

Two collectives, ``allgather`` (the same tensors to every live member) and ``alltoall`` (one
payload per member), each in two modes, because a step and a bookkeeping call fail
differently:
- ``allgather(..., strict=True)`` (the data path of one forward pass): keyed by
  ``(epoch, seq)``; a membership change while it waits raises :class:`PeerLost` on every
  survivor, and ``seq`` restarts at 0 in the new epoch, so the survivors' next forward passes
  line up again. The caller fails the step and runs it again (its inputs are unchanged).
- ``allgather(..., strict=False)`` (idempotent state like "has unfinished requests"): keyed
  by a counter alone; it completes with the contributions of the live members (and a dead
  member's, if it arrived before the death) and never raises.

The epoch is the number of members known dead (members never come back within a group's
life: a restarted engine rank joins a new group), so two survivors with the same dead set have
the same epoch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import DetectorConfig
from ..detector import FailureDetector
from . import wire

__all__ = ["LiveGroup", "PeerLost", "PEER_LOST_MARK"]

log = logging.getLogger(__name__)

PEER_LOST_MARK = "resilient-ep: peer lost"
"""Starts the message of every :class:`PeerLost`; engines that turn a worker's exception into
a string (vLLM's executor does) recognise a lost peer by it."""


class PeerLost(RuntimeError):
    """A member of the group died (or hung) during a strict collective."""

    def __init__(self, group: str, dead: Iterable[int], epoch: int):
        self.group = group
        self.dead = frozenset(dead)
        self.epoch = epoch
        super().__init__(f"{PEER_LOST_MARK}: group {group!r} lost rank(s) "
                         f"{sorted(self.dead)}, now epoch {epoch}")


@dataclass
class _Msg:
    src: int
    epoch: int
    key: tuple
    tensors: list


class LiveGroup:
    """``size`` members, this one is ``rank``; ``endpoints[r]`` is member r's inbox address.

    ``on_change(dead: frozenset[int], epoch: int)`` callbacks run (in the caller's thread, from
    inside a collective) each time the dead set grows.
    """

    def __init__(self, name: str, rank: int, endpoints: list[str], *,
                 detector: DetectorConfig | None = None, ctx: zmq.Context | None = None,
                 tied_to_parent: bool = False):
        self.name = name
        self.rank = rank
        self.size = len(endpoints)
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} outside a group of {self.size}")
        self.endpoints = list(endpoints)
        self.config = detector or DetectorConfig()
        self.ctx = ctx or zmq.Context.instance()
        self.dead: frozenset[int] = frozenset()
        self._seq = 0          # strict collectives, reset on every epoch change
        self._lenient_seq = 0  # lenient collectives, never reset
        self._strict_epoch = 0  # epoch of the last strict collective begun
        self._held: dict[tuple, _Msg] = {}
        self._listeners: list[Callable[[frozenset[int], int], None]] = []
        self._detector = FailureDetector([], self.config)
        self._heard: set[int] = set()
        self._causes: dict[int, str] = {}

        self._inbox = self.ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.setsockopt(zmq.RCVHWM, 0)
        self._inbox.bind(self.endpoints[rank])
        self._out: dict[int, zmq.Socket] = {}
        self._monitors: dict[zmq.Socket, int] = {}
        self._connected: set[int] = set()
        for peer in self.peers:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            mon = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            s.connect(self.endpoints[peer])
            self._out[peer] = s
            self._monitors[mon] = peer
        self._poller = zmq.Poller()
        self._poller.register(self._inbox, zmq.POLLIN)
        for mon in self._monitors:
            self._poller.register(mon, zmq.POLLIN)
        # A member that is a helper of another process (vLLM's worker of an engine core) leaves
        # the group the moment that parent dies, instead of lingering until it exits itself.
        self._parent = os.getppid() if tied_to_parent else None
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                    name=f"resilient-ep-hb-{name}-{rank}")
        self._hb.start()

    # ------------------------------------------------------------------ membership
    @property
    def peers(self) -> list[int]:
        return [r for r in range(self.size) if r != self.rank]

    @property
    def live(self) -> list[int]:
        return [r for r in range(self.size) if r not in self.dead]

    @property
    def epoch(self) -> int:
        return len(self.dead)

    def add_listener(self, fn: Callable[[frozenset[int], int], None]) -> None:
        self._listeners.append(fn)

    def cause(self, rank: int) -> str | None:
        """How a dead member was found out: 'crash', 'hang' or 'reported'."""
        return self._causes.get(rank)

    def _declare(self, ranks: Iterable[int], cause: str) -> bool:
        new = {r for r in ranks if r not in self.dead and r != self.rank and 0 <= r < self.size}
        if not new:
            return False
        self.dead = frozenset(self.dead | new)
        for r in new:
            self._causes[r] = cause
            self._detector.forget(r)
        self._seq = 0
        self._held = {k: m for k, m in self._held.items()
                      if m.key[0] == "l" or m.epoch >= self.epoch}
        log.warning("[%s rank %d] rank(s) %s %s; live %s, epoch %d", self.name, self.rank,
                    sorted(new), {"crash": "crashed", "hang": "hung"}.get(cause, "reported dead"),
                    self.live, self.epoch)
        for fn in self._listeners:
            fn(self.dead, self.epoch)
        return True

    # ------------------------------------------------------------------ collectives
    def allgather(self, tensors: list[torch.Tensor], *, strict: bool = True
                  ) -> dict[int, list[torch.Tensor]]:
        """Every live member's ``tensors`` (this one's included, by reference), by rank.

        Strict: raises :class:`PeerLost` when the membership changes before it completes.
        Lenient: completes over whoever is live when it completes.
        """
        return self._exchange(None, list(tensors), strict)

    def alltoall(self, payloads: dict[int, list[torch.Tensor]], *, strict: bool = True
                 ) -> dict[int, list[torch.Tensor]]:
        """Send ``payloads[peer]`` to each live peer; returns what each live member sent
        this one (``payloads[self.rank]`` for itself). Same failure rules as ``allgather``."""
        return self._exchange(payloads, list(payloads[self.rank]), strict)

    def _exchange(self, payloads: dict[int, list[torch.Tensor]] | None,
                  own: list[torch.Tensor], strict: bool
                  ) -> dict[int, list[torch.Tensor]]:
        epoch0 = self.epoch
        if strict and epoch0 != self._strict_epoch:
            # A member died since our last strict collective: the caller's pass is broken
            # even though this exchange has not started (peers may be mid-way elsewhere).
            self._strict_epoch = epoch0
            raise PeerLost(self.name, self.dead, epoch0)
        if strict:
            key = ("s", self.epoch, self._seq)
            self._seq += 1
        else:
            key = ("l", self._lenient_seq)
            self._lenient_seq += 1
        header = {"t": "c", "key": key, "dead": sorted(self.dead), "src": self.rank,
                  "epoch": self.epoch}
        shared = wire.encode(header, own) if payloads is None else None  # allgather: once
        for peer in self.live:
            if peer != self.rank:
                frames = shared if shared is not None else wire.encode(header, payloads[peer])
                self._out[peer].send_multipart(frames, copy=False)
        got: dict[int, list[torch.Tensor]] = {self.rank: own}
        while True:
            if strict and self.epoch != epoch0:
                self._strict_epoch = self.epoch
                raise PeerLost(self.name, self.dead, self.epoch)
            for peer in self.live:
                if peer not in got:
                    msg = self._held.pop((key, peer), None)
                    if msg is not None:
                        got[peer] = msg.tensors
            if all(p in got for p in self.live):
                return {p: got[p] for p in self.live}
            self._pump(timeout_s=self.config.heartbeat_interval_ms / 1000.0)

    # ------------------------------------------------------------------ I/O
    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for messages and socket events; run the detector."""
        ready = dict(self._poller.poll(timeout_s * 1000))
        now = time.monotonic()
        for mon, peer in self._monitors.items():
            if mon in ready:
                while True:
                    try:
                        ev = recv_monitor_message(mon, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if ev["event"] == zmq.EVENT_CONNECTED:
                        self._connected.add(peer)
                    elif ev["event"] == zmq.EVENT_DISCONNECTED and peer in self._connected:
                        self._connected.discard(peer)
                        self._detector.disconnected(peer, now)
        if self._inbox in ready:
            while True:
                try:
                    frames = self._inbox.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                header, tensors = wire.decode(frames)
                src = header["src"]
                if src in self.dead:
                    continue  # a dead or fenced member's late message
                if src not in self._heard:
                    self._heard.add(src)
                    self._detector.reset(src, now)
                self._detector.heartbeat(src, now)
                theirs = set(header.get("dead", ()))
                if not theirs <= self.dead:
                    self._declare(theirs, "reported")
                if header["t"] == "bye":
                    self._declare([src], "crash")
                    continue
                if header["t"] != "c":
                    continue
                key = tuple(header["key"])
                if key[0] == "s" and header["epoch"] < self.epoch:
                    continue  # a strict collective of an epoch we left
                self._held[(key, src)] = _Msg(src, header["epoch"], key, tensors)
        for s in self._detector.poll(now):
            self._declare([s.rank], s.kind)

    def _heartbeat_loop(self) -> None:
        socks = {}
        try:
            for peer in self.peers:
                s = self.ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 100)
                s.setsockopt(zmq.IMMEDIATE, 1)
                s.connect(self.endpoints[peer])
                socks[peer] = s
            interval = self.config.heartbeat_interval_ms / 1000.0
            while not self._stop.wait(interval):
                if self._parent is not None and os.getppid() != self._parent:
                    bye = wire.encode({"t": "bye", "src": self.rank, "epoch": self.epoch,
                                       "dead": sorted(self.dead)})
                    for peer, s in socks.items():
                        try:
                            s.send_multipart(bye, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            pass
                    log.warning("[%s rank %d] parent process gone: left the group",
                                self.name, self.rank)
                    time.sleep(0.05)  # let the goodbyes leave before the process dies
                    return
                frames = wire.encode({"t": "hb", "src": self.rank, "epoch": self.epoch,
                                      "dead": sorted(self.dead)})
                for peer, s in socks.items():
                    if peer in self.dead:
                        continue
                    try:
                        s.send_multipart(frames, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
        except zmq.ZMQError:  # context terminated at exit
            pass
        finally:
            for s in socks.values():
                s.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._hb.join(timeout=2)
        for s in (*self._out.values(), *self._monitors, self._inbox):
            s.close(linger=0)
        self._out.clear()
        self._monitors.clear()
