"""A collective group that survives the death of a member.

Engines run small collectives between their data-parallel ranks on every step (vLLM: the
token-count all-reduce, the MoE all-gather and reduce-scatter, the "anyone busy?" sum). Over
gloo or NCCL a dead member makes each of them hang or raise, and the group cannot shrink.
:class:`LiveGroup` runs the same exchanges over ZeroMQ among the members still alive, with the
core's :class:`~resilient_ep.liveness.detector.FailureDetector` deciding who is.

Detection, per member process, while it waits in a collective:
- crash: the socket monitor of the connection to a peer reports it dropped after it was up
  (a SIGKILLed process's sockets close at once, and so do those of a member that shuts down);
- hang: heartbeats (a background thread, ``detector.heartbeat_interval_ms``) stop for
  ``detector.heartbeat_timeout_ms``; a peer is watched from its first message on;
- goodbye: a member tied to a parent process (``tied_to_parent``) tells its peers it is gone
  as soon as that parent dies;
- hearsay: every message carries its sender's dead set; a newer one is adopted (all members
  converge on the same view even when only one of them saw the failure);
- authority: a :class:`~resilient_ep.membership.Membership` given as ``membership`` (the
  instance's membership authority in this process) is read on every pump: a rank that someone
  else took out of it is taken out of the group as if gossiped (cause ``'reported'``), and every
  death the group finds out is written into it (``fail``: DEAD for a crash, FENCED for a hang).
  With ``membership_replica=True`` the Membership is a replica of an authority in another
  process (a :class:`~resilient_ep.liveness.MembershipSubscriber` feeds it, with the
  authority's epochs): the group reads it but writes nothing into it; what the group finds out
  itself goes to the authority (a :class:`~resilient_ep.liveness.LossReporter` listener), so
  every epoch the group reports is one the authority decided.

Two collectives, ``allgather`` (the same tensors to every live member) and ``alltoall`` (one
payload per member), each in two modes, because a step and a bookkeeping call fail
differently:
- ``allgather(..., strict=True)`` (the data path of one forward pass): keyed by
  ``(generation, seq)``; a membership change while it waits raises :class:`PeerLost` on every
  survivor, and ``seq`` restarts at 0 in the new generation, so the survivors' next forward
  passes line up again. The caller fails the step and runs it again (its inputs are unchanged).
- ``allgather(..., strict=False)`` (idempotent state like "has unfinished requests"): keyed
  by a counter alone; it completes with the contributions of the live members (and a dead
  member's, if it arrived before the death) and never raises :class:`PeerLost`.

Lifecycle (as every I/O part of the core):
- ``configure(epoch, members)``: adopt a membership decided elsewhere. Members not in
  ``members`` become dead (cause ``'configured'``; members never come back within a group's
  life, a restarted rank joins a new group), the epoch is raised to ``epoch``; a call with an
  epoch older than the group's is a no-op. It re-arms a group that was aborted. A member left
  out of ``members`` itself is fenced: its collectives raise :class:`GroupAborted`.
- ``abort()``: a collective blocked in another thread raises :class:`GroupAborted` at once, and
  so does every later one until ``configure`` re-arms the group.
- ``errored()``: the last fatal error (an abort, a fence, a socket error, the heartbeat thread's
  death, the parent of a tied member gone), or None.
- ``shutdown()`` (alias ``close()``): stop the heartbeats and close every socket; the peers see
  the connections drop and take this member out.

Every blocking call takes a ``deadline`` (``time.monotonic()`` seconds, as
:meth:`~resilient_ep.transport.zmq_transport.ZmqTransport.recv` does): past it a collective
raises :class:`TimeoutError` naming the group, the key and the members not heard from.
``deadline=None`` waits until the membership changes. A collective that timed out (or was
aborted) has already sent its contribution, so the members that did not take part complete the
same key with it later and every member's next collective lines up again.

Epochs. Collectives never key on the epoch: they key on the *generation*, the number of
members known dead, which every member with the same dead set shares, whatever else it heard.
``epoch`` is what the group reports (``PeerLost.epoch``, listeners, heartbeats):
- no Membership attached: the generation (one per death; two survivors with the same dead set
  report the same epoch), raised to ``epoch`` by ``configure``;
- a Membership attached: that Membership's epoch, read live (one bump per transition, however
  many ranks it takes out, as everywhere else in the core). Each process has its own
  Membership, so members in different processes may report different epochs for the same dead
  set; compare dead sets (or generations), not epochs, across processes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import DetectorConfig
from ..liveness.detector import FailureDetector
from ..membership import Membership, MembershipView, RankState
from . import curve, wire
from .monitors import close_monitored, monitor_socket

__all__ = ["LiveGroup", "PeerLost", "GroupAborted", "PEER_LOST_MARK", "is_peer_lost"]

log = logging.getLogger(__name__)

PEER_LOST_MARK = "resilient-ep: peer lost"
"""Starts the message of every :class:`PeerLost`; engines that turn a worker's exception into
a string (vLLM's executor does) recognise a lost peer by it."""

SHUTDOWN_WAIT_S = 2.0
"""How long ``shutdown`` waits for a collective of another thread and the heartbeat thread."""


class PeerLost(RuntimeError):
    """A member of the group died (or hung) during a strict collective."""

    def __init__(self, group: str, dead: Iterable[int], epoch: int):
        self.group = group
        self.dead = frozenset(dead)
        self.epoch = epoch
        super().__init__(f"{PEER_LOST_MARK}: group {group!r} lost rank(s) "
                         f"{sorted(self.dead)}, now epoch {epoch}")


def is_peer_lost(exc: BaseException | None) -> bool:
    """True when ``exc``, its cause chain or its text (engines forward a worker's error as a
    string) is a :class:`PeerLost`."""
    while exc is not None:
        if isinstance(exc, PeerLost) or PEER_LOST_MARK in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class GroupAborted(RuntimeError):
    """The group was aborted, fenced or shut down: no collective runs until ``configure``."""

    def __init__(self, group: str, rank: int, reason: str):
        self.group = group
        self.rank = rank
        self.reason = reason
        super().__init__(f"resilient-ep: group {group!r} rank {rank} {reason}")


@dataclass
class _Msg:
    src: int
    key: tuple
    tensors: list


RECONNECT_IVL_MS = 5
RECONNECT_IVL_MAX_MS = 100


def _quick_reconnect(sock: zmq.Socket) -> zmq.Socket:
    """A connecting socket that retries soon: a group's members make their sockets at about
    the same time (a join's group is made by every member as it hears of the join), so a
    connect often comes before the peer's bind; ZeroMQ's default retry (100 ms) then delays
    the group's first collective by that much. First retry after 5 ms, doubling to 100 ms."""
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    return sock


class LiveGroup:
    """``size`` members, this one is ``rank``; ``endpoints[r]`` is member r's inbox address.

    ``on_change(dead: frozenset[int], epoch: int)`` callbacks run each time the dead set grows,
    in the thread that applies the change (the caller of a collective, from inside it, or the
    caller of ``configure`` when no collective runs).

    ``membership``: the membership authority of this process (``num_ranks == size``), fed with
    every death the group finds out and read for the ones others decide; with
    ``membership_replica`` only read (module docstring).
    """

    def __init__(self, name: str, rank: int, endpoints: list[str], *,
                 detector: DetectorConfig | None = None, ctx: zmq.Context | None = None,
                 tied_to_parent: bool = False, membership: Membership | None = None,
                 membership_replica: bool = False):
        self.name = name
        self.rank = rank
        self.size = len(endpoints)
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} outside a group of {self.size}")
        if membership is not None and membership.num_ranks != self.size:
            raise ValueError(f"membership has {membership.num_ranks} ranks, group {name!r} "
                             f"has {self.size} members")
        self.endpoints = list(endpoints)
        self.config = detector or DetectorConfig()
        self.ctx = ctx or zmq.Context.instance()
        self.dead: frozenset[int] = frozenset()
        self._membership = membership
        self._replica = membership_replica and membership is not None
        self._m_epoch = -1      # the membership epoch last read
        self._epoch = 0         # without a membership: the generation, raised by configure
        self._seq = 0           # strict collectives, reset on every generation change
        self._lenient_seq = 0   # lenient collectives, never reset
        self._strict_gen = 0    # generation of the last strict collective begun
        self._held: dict[tuple, _Msg] = {}
        self._listeners: list[Callable[[frozenset[int], int], None]] = []
        self._detector = FailureDetector([], self.config)
        self._heard: set[int] = set()
        self._causes: dict[int, str] = {}
        self.dropped: Counter[str] = Counter()
        """Messages received and dropped, by reason (``wire.WireError.reason``, ``fields``)."""
        self.collective_s = 0.0
        """Time spent in this member's collectives (waiting for the others included)."""
        self._error: Exception | None = None
        self._aborted: GroupAborted | None = None
        self._closed = False
        self._busy = threading.Lock()      # held by the thread inside a collective
        self._pending: list[tuple[int, frozenset[int]]] = []  # configure calls not applied yet
        self._pending_lock = threading.Lock()
        self._wake_lock = threading.Lock()  # the wake pipe's sending end, from any thread

        self._inbox = curve.server(self.ctx.socket(zmq.PULL))
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.setsockopt(zmq.RCVHWM, 0)
        self._inbox.bind(self.endpoints[rank])
        self._out: dict[int, zmq.Socket] = {}
        self._monitors: dict[zmq.Socket, int] = {}
        self._connected: set[int] = set()
        for peer in self.peers:
            s = _quick_reconnect(curve.client(self.ctx.socket(zmq.PUSH)))
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            mon = monitor_socket(s, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            s.connect(self.endpoints[peer])
            self._out[peer] = s
            self._monitors[mon] = peer
        # abort() and configure() from another thread wake a collective blocked in poll.
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        addr = f"inproc://resilient-ep-wake-{name}-{rank}-{id(self)}"
        self._wake_rx.bind(addr)
        self._wake_tx.connect(addr)
        self._poller = zmq.Poller()
        self._poller.register(self._inbox, zmq.POLLIN)
        self._poller.register(self._wake_rx, zmq.POLLIN)
        for mon in self._monitors:
            self._poller.register(mon, zmq.POLLIN)
        self._sync_membership()
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
    def generation(self) -> int:
        """The number of members known dead: what strict collectives are keyed by."""
        return len(self.dead)

    @property
    def epoch(self) -> int:
        """The attached Membership's epoch, else the generation raised by ``configure``."""
        return self._membership.epoch if self._membership is not None else self._epoch

    @property
    def membership(self) -> Membership | None:
        return self._membership

    def add_listener(self, fn: Callable[[frozenset[int], int], None]) -> None:
        self._listeners.append(fn)

    def cause(self, rank: int) -> str | None:
        """How a dead member was found out: 'crash', 'hang', 'reported' (by a peer or the
        membership) or 'configured'."""
        return self._causes.get(rank)

    def _declare(self, ranks: Iterable[int], cause: str, *, write_back: bool = True,
                 epoch: int = 0) -> bool:
        """Take ``ranks`` out; the epoch rises by the change, to ``epoch`` at least, before
        the listeners hear of it."""
        new = {r for r in ranks if r not in self.dead and r != self.rank and 0 <= r < self.size}
        if not new:
            return False
        self.dead = frozenset(self.dead | new)
        for r in new:
            self._causes[r] = cause
            self._detector.forget(r)
        m = self._membership
        if m is None:
            self._epoch = max(self._epoch + len(new), epoch)
        elif write_back and not self._replica:
            m.fail(sorted(new), state=RankState.FENCED if cause == "hang" else RankState.DEAD)
            if epoch > m.epoch:
                m.adopt(MembershipView(epoch, m.view().states))
        self._seq = 0
        gen = self.generation
        self._held = {k: m for k, m in self._held.items() if m.key[0] == "l" or m.key[1] >= gen}
        log.warning("[%s rank %d] rank(s) %s %s; live %s, epoch %d", self.name, self.rank,
                    sorted(new), {"crash": "crashed", "hang": "hung"}.get(cause, f"{cause} dead"),
                    self.live, self.epoch)
        for fn in self._listeners:
            fn(self.dead, self.epoch)
        return True

    def _sync_membership(self) -> None:
        """Take out the ranks that someone else took out of the attached Membership."""
        m = self._membership
        if m is None or m.epoch == self._m_epoch:
            return
        view = m.view()
        self._m_epoch = view.epoch
        out = [r for r, s in enumerate(view.states) if s is not RankState.LIVE]
        self._declare(out, "reported", write_back=False)
        if self.rank in out and self._aborted is None:
            self._fence(f"is fenced: out of the membership at epoch {view.epoch}")

    def _fence(self, reason: str) -> None:
        err = GroupAborted(self.name, self.rank, reason)
        self._aborted = err
        self._error = err
        log.warning("[%s rank %d] %s", self.name, self.rank, reason)

    # ------------------------------------------------------------------ lifecycle
    def configure(self, epoch: int, members: Iterable[int]) -> None:
        """Adopt a membership decided elsewhere (module docstring). Applied at once when no
        collective runs, else by the running collective at its next pump."""
        members = frozenset(int(r) for r in members)
        bad = sorted(r for r in members if not 0 <= r < self.size)
        if bad:
            raise ValueError(f"configure: rank(s) {bad} outside group {self.name!r} of {self.size}")
        with self._pending_lock:
            self._pending.append((int(epoch), members))
        if self._busy.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._busy.release()
        else:
            self._wake()

    def _apply_pending(self) -> None:
        if not self._pending:
            return  # the common case, on every pump of the per-layer path
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for epoch, members in pending:
            self._sync_membership()
            if epoch < self.epoch:
                log.info("[%s rank %d] configure(epoch %d) ignored: the group is at epoch %d",
                         self.name, self.rank, epoch, self.epoch)
                continue
            if self.rank in members and not self._closed:
                if self._error is not None and self._error is self._aborted:
                    self._error = None  # the abort or fence, not another fatal error
                self._aborted = None  # re-armed
            self._declare(set(range(self.size)) - members, "configured", epoch=epoch)
            m = self._membership
            if m is None:
                self._epoch = max(self._epoch, epoch)
            elif epoch > m.epoch and not self._replica:
                m.adopt(MembershipView(epoch, m.view().states))
            if m is not None:
                self._m_epoch = m.epoch
            if self.rank not in members:
                self._fence(f"is fenced: not a member at epoch {epoch}")

    def settle(self) -> None:
        """A group made between two passes (its owner runs none of its collectives yet):
        adopt the attached membership and pending ``configure`` calls now, and let the first
        strict collective start in that generation instead of raising :class:`PeerLost` for
        a change no pass of it saw."""
        with self._busy:
            self._apply_pending()
            self._sync_membership()
            self._strict_gen = self.generation

    def abort(self) -> None:
        """Make a collective blocked in another thread (and every later one, until
        ``configure``) raise :class:`GroupAborted`."""
        self._fence("aborted")
        self._wake()

    def errored(self) -> Exception | None:
        return self._error

    def shutdown(self) -> None:
        """Stop the heartbeats and close every socket (idempotent). A collective running in
        another thread is aborted first; waits at most ``SHUTDOWN_WAIT_S`` for it."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._aborted is None:
            self._aborted = GroupAborted(self.name, self.rank, "is shut down")
        self._wake()
        idle = self._busy.acquire(timeout=SHUTDOWN_WAIT_S)
        if not idle:
            log.warning("[%s rank %d] shutdown: a collective still runs after %.1f s; closing "
                        "its sockets anyway", self.name, self.rank, SHUTDOWN_WAIT_S)
        try:
            self._hb.join(timeout=SHUTDOWN_WAIT_S)
            with self._wake_lock:
                mons = {peer: mon for mon, peer in self._monitors.items()}
                for peer, s in self._out.items():  # monitor stopped first (``monitors``)
                    close_monitored(s, mons.get(peer))
                for s in (self._inbox, self._wake_rx, self._wake_tx):
                    s.close(linger=0)
            self._out.clear()
            self._monitors.clear()
        finally:
            if idle:
                self._busy.release()

    close = shutdown

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_tx.closed:
                return
            try:
                self._wake_tx.send(b"", flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the pipe is full: the collective is woken already

    # ------------------------------------------------------------------ collectives
    def allgather(self, tensors: list[torch.Tensor], *, strict: bool = True,
                  deadline: float | None = None) -> dict[int, list[torch.Tensor]]:
        """Every live member's ``tensors`` (this one's included, by reference), by rank.

        Strict: raises :class:`PeerLost` when the membership changes before it completes.
        Lenient: completes over whoever is live when it completes. Either raises
        :class:`TimeoutError` past ``deadline`` (monotonic seconds) and :class:`GroupAborted`
        when aborted.
        """
        return self._exchange(None, list(tensors), strict, deadline)

    def alltoall(self, payloads: dict[int, list[torch.Tensor]], *, strict: bool = True,
                 deadline: float | None = None) -> dict[int, list[torch.Tensor]]:
        """Send ``payloads[peer]`` to each live peer; returns what each live member sent
        this one (``payloads[self.rank]`` for itself). Same failure rules as ``allgather``."""
        return self._exchange(payloads, list(payloads[self.rank]), strict, deadline)

    def _exchange(self, payloads: dict[int, list[torch.Tensor]] | None,
                  own: list[torch.Tensor], strict: bool, deadline: float | None
                  ) -> dict[int, list[torch.Tensor]]:
        timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._busy.acquire(timeout=timeout):
            raise TimeoutError(f"group {self.name!r} rank {self.rank}: another collective of "
                               f"this member still runs at the deadline")
        t0 = time.monotonic()
        try:
            return self._exchange_locked(payloads, own, strict, deadline)
        except zmq.ZMQError as e:
            if not self._closed:
                self._error = e
            raise
        finally:
            self.collective_s += time.monotonic() - t0
            self._busy.release()
            # A configure() that found us busy after our last pump: apply it now.
            if self._pending and self._busy.acquire(blocking=False):
                try:
                    self._apply_pending()
                finally:
                    self._busy.release()

    def _exchange_locked(self, payloads, own, strict, deadline):
        if self._closed:
            raise GroupAborted(self.name, self.rank, "is shut down")
        self._apply_pending()
        self._sync_membership()
        if self._aborted is not None:
            raise self._aborted
        gen0 = self.generation
        if strict and gen0 != self._strict_gen:
            # A member died since our last strict collective: the caller's pass is broken
            # even though this exchange has not started (peers may be mid-way elsewhere).
            self._strict_gen = gen0
            raise PeerLost(self.name, self.dead, self.epoch)
        if strict:
            key = ("s", gen0, self._seq)
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
        interval = self.config.heartbeat_interval_ms / 1000.0
        try:
            while True:
                if self._aborted is not None:
                    raise self._aborted
                if strict and self.generation != gen0:
                    self._strict_gen = self.generation
                    raise PeerLost(self.name, self.dead, self.epoch)
                for peer in self.live:
                    if peer not in got:
                        msg = self._held.pop((key, peer), None)
                        if msg is not None:
                            got[peer] = msg.tensors
                if all(p in got for p in self.live):
                    return {p: got[p] for p in self.live}
                wait = interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        missing = [p for p in self.live if p not in got]
                        raise TimeoutError(
                            f"group {self.name!r} rank {self.rank}: "
                            f"{'strict' if strict else 'lenient'} collective {key} timed out "
                            f"waiting for rank(s) {missing} (live {self.live}, epoch {self.epoch})")
                    wait = min(wait, left)
                self._pump(timeout_s=wait)
        except BaseException:  # timed out, aborted, lost a peer: drop what came for the key
            for peer in range(self.size):
                self._held.pop((key, peer), None)
            raise

    # ------------------------------------------------------------------ I/O
    def _stale(self, key: tuple) -> bool:
        """A message for a collective this member finished, abandoned or left behind."""
        if key[0] == "s":
            return key[1] < self.generation or (key[1] == self.generation
                                                 and key[2] < self._seq - 1)
        return key[1] < self._lenient_seq - 1

    def _read_monitors(self, now: float, ready=None) -> None:
        """The connection events of the sockets to the peers (those ``ready`` says have
        some; None: every one). Called with ``_busy`` held: by a collective, or by the
        heartbeat thread while none runs (unread events would stall ZeroMQ: ``monitors``)."""
        for mon, peer in self._monitors.items():
            if ready is not None and mon not in ready:
                continue
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

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for messages and socket events; run the detector."""
        ready = dict(self._poller.poll(timeout_s * 1000))
        now = time.monotonic()
        if self._wake_rx in ready:
            while True:
                try:
                    self._wake_rx.recv(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
        self._apply_pending()
        self._sync_membership()
        self._read_monitors(now, ready)
        if self._inbox in ready:
            while True:
                try:
                    frames = self._inbox.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                got = self._checked(frames)
                if got is None:
                    continue
                header, tensors = got
                src = header["src"]
                if src in self.dead:
                    self._drop("non_member")  # a dead or fenced member's late message
                    continue
                if src not in self._heard:
                    self._heard.add(src)
                    self._detector.reset(src, now)
                self._detector.heartbeat(src, now)
                theirs = set(header["dead"])
                if not theirs <= self.dead:
                    self._declare(theirs, "reported")
                if header["t"] == "bye":
                    self._declare([src], "crash")
                    continue
                if header["t"] != "c":
                    continue
                key = tuple(header["key"])
                if self._stale(key):
                    self._drop("stale")
                    continue
                self._held[(key, src)] = _Msg(src, key, tensors)
        for s in self._detector.poll(now):
            self._declare([s.rank], s.kind)

    def _checked(self, frames) -> tuple[dict, list] | None:
        """A message of a member of this group, well formed; else None (counted in
        ``self.dropped`` by reason)."""
        try:
            header, tensors = wire.decode(frames)
        except wire.WireError as e:
            return self._drop(e.reason)
        src, dead, t = header.get("src"), header.get("dead", []), header.get("t")
        if (type(src) is not int or not 0 <= src < self.size or src == self.rank
                or not isinstance(t, str) or not isinstance(dead, list)
                or not all(type(r) is int and 0 <= r < self.size for r in dead)):
            return self._drop("fields")
        if t == "c":
            key = header.get("key")
            if not (isinstance(key, list) and len(key) in (2, 3) and key[0] in ("s", "l")
                    and all(type(k) is int for k in key[1:])):
                return self._drop("fields")
        header["dead"] = dead
        return header, tensors

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def _heartbeat_loop(self) -> None:
        socks = {}
        try:
            for peer in self.peers:
                s = _quick_reconnect(curve.client(self.ctx.socket(zmq.PUSH)))
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
                    self._error = GroupAborted(self.name, self.rank,
                                               "left the group: its parent process is gone")
                    log.warning("[%s rank %d] parent process gone: left the group",
                                self.name, self.rank)
                    time.sleep(0.05)  # let the goodbyes leave before the process dies
                    return
                if self._busy.acquire(blocking=False):  # idle: nobody reads the monitors
                    try:
                        if not self._closed:
                            self._read_monitors(time.monotonic())
                    finally:
                        self._busy.release()
                frames = wire.encode({"t": "hb", "src": self.rank, "epoch": self.epoch,
                                      "dead": sorted(self.dead)})
                for peer, s in socks.items():
                    if peer in self.dead:
                        continue
                    try:
                        s.send_multipart(frames, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
        except zmq.ZMQError as e:  # the context terminated at exit, or a broken socket
            if not self._stop.is_set() and e.errno != zmq.ETERM:
                self._error = e
                log.error("[%s rank %d] heartbeat thread died: %s", self.name, self.rank, e)
        except Exception as e:  # noqa: BLE001 - reported through errored()
            self._error = e
            log.exception("[%s rank %d] heartbeat thread died", self.name, self.rank)
        finally:
            for s in socks.values():
                s.close(linger=0)
