"""The membership authority of one instance as a thread of its own: :class:`LivenessMonitor`
runs a :class:`~.tracker.LivenessTracker` (the decisions) and feeds it, in one thread:
- each rank's process (its ``sentinel``): an exit is a loss (``cause="exit"``, or the cause
  of the fence that made it exit);
- the liveness socket (:mod:`.beacons`): beacons feed the
  :class:`~resilient_ep.liveness.detector.FailureDetector`; a rank silent for
  ``detector.heartbeat_timeout_ms`` (watched from its first beacon on) is fenced
  (``"hang"``); a loss report from a collective group fences the rank it names
  (``"reported"``: a dead or frozen helper process of a rank whose main process still runs);
- a periodic ``tick`` the host uses for its own bookkeeping (e.g. a census of each rank's
  child processes, so that a fence can kill them all);
- several hosts: ``remote`` ranks (no process here to watch or kill) and a heartbeat datagram
  socket (``datagrams``: ``(host, port)`` and the instance key,
  :mod:`.datagrams`): each heartbeat feeds the detector and earns a live rank its lease; a
  remote rank's loss is recorded when it is fenced (it stops by itself: lease, membership).

Fencing is the host's ``fence(rank, why)`` (kill the rank's processes: it must never serve
again); the loss itself is recorded when the process is seen gone: one epoch bump in the
:class:`~resilient_ep.membership.Membership` (``dead`` after an exit, ``fenced`` after a
fence), then every listener gets a :class:`RankLoss`. With ``publish_endpoint`` each loss is
also published (ZeroMQ PUB, JSON), and the whole list again every second, so a
:class:`MembershipSubscriber` in another process of the instance (vLLM runs several API
servers) that started late still learns every loss, in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict

import zmq

from ..config import DetectorConfig
from ..membership import Membership, MembershipView, RankState
from ..transport import curve, wire
from ..transport.loops import ReceiveLoop, run_restarting
from .tracker import LivenessTracker, RankJoin, RankLoss

__all__ = ["RankLoss", "RankJoin", "LivenessMonitor", "MembershipSubscriber"]  # from .tracker

log = logging.getLogger(__name__)

REPUBLISH_S = 1.0


class LivenessMonitor:
    """A :class:`~.tracker.LivenessTracker` in a thread of its own, fed by the rank processes'
    sentinels and the liveness socket (module docstring)."""

    def __init__(self, membership: Membership, procs: dict[int, object], *,
                 detector: DetectorConfig | None = None, beacon_endpoint: str | None = None,
                 publish_endpoint: str | None = None,
                 fence: Callable[[int, str], None] | None = None,
                 tick: Callable[[], None] | None = None, name: str = "liveness",
                 remote: Iterable[int] = (), datagrams: tuple[tuple[str, int], bytes] | None = None):
        self.membership = membership
        self.procs = dict(procs)
        self.tracker = LivenessTracker(membership, self.procs, detector=detector, fence=fence,
                                       remote=remote)
        self.datagrams = datagrams
        self.leases_granted = 0
        self.beacon_endpoint = beacon_endpoint
        self.publish_endpoint = publish_endpoint
        self._tick = tick
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"resilient-ep-{name}")
        self._pub = None
        self.restarts = 0
        """Times the loop raised and was started again (``transport/loops.py``)."""
        self.tracker.add_listener(self._publish_loss)
        self.tracker.add_join_listener(self._publish_loss)
        self._admissions: list[tuple[str, int, object]] = []
        self._admissions_lock = threading.Lock()

    @property
    def detector(self):
        return self.tracker.detector

    @property
    def losses(self) -> list[RankLoss]:
        return self.tracker.losses

    @property
    def dropped(self) -> "Counter[str]":
        """Malformed or foreign messages on the liveness socket, dropped, by reason."""
        return self.tracker.dropped

    @property
    def events(self) -> list[RankLoss | RankJoin]:
        return self.tracker.events

    def add_listener(self, fn: Callable[[RankLoss], None]) -> None:
        self.tracker.add_listener(fn)

    def add_join_listener(self, fn: Callable[[RankJoin], None]) -> None:
        self.tracker.add_join_listener(fn)

    # ------------------------------------------------------------------ joins
    def begin_join(self, rank: int, proc) -> None:
        """A replacement process ``proc`` for the lost ``rank`` has started: watch it (its
        exit while it warms up is a loss like any other; state ``joining``, no epoch bump).
        Taken into the live set by :meth:`admit`."""
        state = self.membership.state(rank)
        if state not in (RankState.DEAD, RankState.FENCED):
            raise ValueError(f"rank {rank} is {state.value}: only a lost rank can rejoin")
        self.membership.begin_join([rank])
        with self._admissions_lock:
            self._admissions.append(("watch", rank, proc))

    def admit(self, rank: int, timeout_s: float = 10.0) -> RankJoin:
        """Take the joining ``rank`` into the live set (one epoch bump, published), in the
        monitor's thread; returns the join once decided."""
        done = threading.Event()
        box: list = []
        with self._admissions_lock:
            self._admissions.append(("admit", rank, (done, box)))
        if not done.wait(timeout_s):
            raise TimeoutError(f"liveness monitor did not admit rank {rank} within {timeout_s} s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def start(self) -> "LivenessMonitor":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def errored(self) -> BaseException | None:
        return self._error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def fence(self, rank: int, cause: str, why: str) -> None:
        """Fence ``rank`` now (once); its exit is then recorded with ``cause``."""
        self.tracker.fence(rank, cause, why)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        self._error = run_restarting(self._serve, name="liveness monitor", stop=self._stop,
                                     on_restart=self._restarted)

    def _restarted(self, _e: BaseException) -> None:
        self.restarts += 1

    def _serve(self) -> None:
        ctx = zmq.Context.instance()
        beacons = pub = dgram = None
        try:
            if self.datagrams is not None:
                from .datagrams import BeaconReceiver
                dgram = BeaconReceiver(self.datagrams[0], self.tracker.ranks,
                                       key=self.datagrams[1])
            if self.beacon_endpoint:
                beacons = curve.server(ctx.socket(zmq.PULL))
                beacons.setsockopt(zmq.LINGER, 0)
                beacons.bind(self.beacon_endpoint)
            if self.publish_endpoint:
                pub = curve.server(ctx.socket(zmq.PUB))
                pub.setsockopt(zmq.LINGER, 500)
                pub.bind(self.publish_endpoint)
            self._pub = pub
            self._loop(beacons, pub, dgram)
        finally:
            self._pub = None
            for s in (beacons, pub):
                if s is not None:
                    s.close(linger=0)
            if dgram is not None:
                dgram.close()

    def _publish_loss(self, _loss: RankLoss) -> None:
        if self._pub is not None:
            self._publish(self._pub)

    def _loop(self, beacons, pub, dgram=None) -> None:
        tracker = self.tracker
        alive = {p.sentinel: (r, p) for r, p in self.procs.items()}
        poller = zmq.Poller()
        for s in alive:
            poller.register(s, zmq.POLLIN)
        if beacons is not None:
            poller.register(beacons, zmq.POLLIN)
        if dgram is not None:
            poller.register(dgram.fileno(), zmq.POLLIN)
        remote_in = bool(tracker.remote)  # runs while a remote rank may still be in
        interval_ms = tracker.detector.config.heartbeat_interval_ms
        next_tick = next_publish = 0.0
        while (alive or (remote_in and self._remote_left())) and not self._stop.is_set():
            ready = dict(poller.poll(interval_ms))
            now = time.monotonic()
            if self._tick is not None and now >= next_tick:
                next_tick = now + 1.0
                self._tick()
            if beacons is not None and beacons in ready:
                while True:
                    try:
                        tracker.beacon(beacons.recv(zmq.NOBLOCK), now)
                    except zmq.Again:
                        break
            if dgram is not None and dgram.fileno() in ready:
                for rank, _pid, seq, boot, addr in dgram.receive():
                    tracker.alive(rank, now)
                    if self.membership.state(rank) is RankState.LIVE:
                        dgram.grant(rank, seq, boot, addr)
                        self.leases_granted += 1
            tracker.poll(now)
            self._take_admissions(alive, poller, now)
            for sentinel in [s for s in alive if s in ready]:
                rank, proc = alive.pop(sentinel)
                poller.unregister(sentinel)
                join = getattr(proc, "join", None)
                if join is not None:
                    join(timeout=1)  # reap it: exit code known, no zombie left
                tracker.exited(rank, getattr(proc, "exitcode", None), now)
            if pub is not None and now >= next_publish:
                next_publish = now + REPUBLISH_S
                self._publish(pub)

    def _remote_left(self) -> bool:
        return any(self.membership.state(r) in (RankState.LIVE, RankState.JOINING)
                   for r in self.tracker.remote)

    def _take_admissions(self, alive: dict, poller, now: float) -> None:
        with self._admissions_lock:
            todo, self._admissions = self._admissions, []
        for what, rank, arg in todo:
            if what == "watch":
                self.procs[rank] = arg
                alive[arg.sentinel] = (rank, arg)
                poller.register(arg.sentinel, zmq.POLLIN)
                continue
            done, box = arg
            try:
                if self.membership.state(rank) is not RankState.JOINING:
                    raise RuntimeError(f"rank {rank} is {self.membership.state(rank).value}, "
                                       "not joining: it was lost while it warmed up")
                box.append(self.tracker.admit(rank, now))
            except BaseException as e:  # handed to the caller of admit()
                box.append(e)
            done.set()

    def _publish(self, pub) -> None:
        try:
            pub.send(membership_message(self.events), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


def membership_message(events: list[RankLoss | RankJoin]) -> bytes:
    """Every loss and join so far, in order: what the monitor publishes (wire format, no
    tensors)."""
    return wire.encode_header({"t": "membership", "events": [
        {"kind": x.kind if isinstance(x, RankJoin) else "loss", **asdict(x)} for x in events]})


_LOSS_FIELDS = {"rank": (int,), "cause": (str,), "exitcode": (int, type(None)),
                "detected_monotonic": (float, int), "epoch": (int,)}
_JOIN_FIELDS = {"rank": (int,), "joined_monotonic": (float, int), "epoch": (int,)}


def parse_membership(msg: bytes) -> list[RankLoss | RankJoin] | None:
    """The events of a :func:`membership_message`; None when malformed."""
    try:
        h = wire.decode_header(msg)
    except wire.WireError:
        return None
    events = h.get("events")
    if h.get("t") != "membership" or not isinstance(events, list):
        return None
    out: list[RankLoss | RankJoin] = []
    last_epoch = 0
    for x in events:
        if not isinstance(x, dict):
            return None
        kind = x.get("kind")
        fields = _LOSS_FIELDS if kind == "loss" else _JOIN_FIELDS if kind == "join" else None
        if fields is None or not all(type(x.get(k)) in ts for k, ts in fields.items()):
            return None
        if x["rank"] < 0 or x["epoch"] < 1 or x["epoch"] < last_epoch:
            return None
        if kind == "loss" and x["cause"] not in ("exit", "hang", "reported"):
            return None
        last_epoch = x["epoch"]
        cls = RankLoss if kind == "loss" else RankJoin
        out.append(cls(**{k: x[k] for k in fields}))
    return out


class MembershipSubscriber(ReceiveLoop):
    """Follows a :class:`LivenessMonitor` of another process (``endpoint``): applies each
    loss and join to this process's ``membership`` with the monitor's epoch (a replica: every
    process of the instance reports the same epoch for the same events) and calls
    ``on_loss(RankLoss)`` / ``on_join(RankJoin)``, in order, once each. ``events``: every
    event applied so far."""

    loop_name = "membership subscriber"
    max_restarts = 1_000_000

    def __init__(self, endpoint: str, membership: Membership,
                 on_loss: Callable[[RankLoss], None], *, poll_ms: int = 50,
                 on_join: Callable[[RankJoin], None] | None = None):
        super().__init__("resilient-ep-membership")
        self.endpoint = endpoint
        self.membership = membership
        self.on_loss = on_loss
        self.on_join = on_join
        self.poll_ms = poll_ms
        self.seen = 0
        self.events: list[RankLoss | RankJoin] = []
        # ``dropped``: publications dropped (malformed, or not signed with this instance's key)

    def _serve(self) -> None:
        sock = curve.client(zmq.Context.instance().socket(zmq.SUB))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                if not sock.poll(self.poll_ms):
                    continue
                try:
                    items = parse_membership(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    continue
                if items is None:
                    self.dropped["malformed"] += 1
                    continue
                for event in items[self.seen:]:
                    if isinstance(event, RankJoin):
                        self.membership.join([event.rank])
                    else:
                        state = RankState.DEAD if event.cause == "exit" else RankState.FENCED
                        self.membership.fail([event.rank], state=state)
                    if event.epoch > self.membership.epoch:
                        self.membership.adopt(MembershipView(event.epoch,
                                                             self.membership.view().states))
                    self.seen += 1
                    self.events.append(event)
                    fn = self.on_join if isinstance(event, RankJoin) else self.on_loss
                    if fn is None:
                        continue
                    try:
                        fn(event)
                    except Exception:
                        log.exception("resilient-ep: a membership listener failed")
        finally:
            sock.close(linger=0)
