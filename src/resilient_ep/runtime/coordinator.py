"""The reference runtime's front end: starts the rank processes (:mod:`.rank_processes`),
balances requests (:mod:`.requests`) over them, detects failures and drives recovery.

One thread (the *loop*) owns every socket: per-rank control PAIRs (with socket monitors: a
SIGKILLed rank is seen in milliseconds), the liveness PULL (each rank's
:class:`~resilient_ep.liveness.Beacon`) and a wake-up pipe for calls from other threads
(``submit``, ``kill``, ``shutdown``). What it sees goes to the instance's membership
authority, a :class:`~resilient_ep.liveness.LivenessTracker` (the decisions vLLM's front end
runs too): a dropped connection is a crash, a rank silent for ``detector.heartbeat_timeout_ms``
is fenced (a hang; it may wake up and be taken back). Recovery on each loss:

1. membership: a new epoch, the rank ``dead`` (crash) or ``fenced`` (hang);
2. routing: the layout replanned over the live ranks (``placement.replan``: nothing moves;
   experts that lost every replica are reported) and broadcast; every rank patches its routing
   table in place and re-sends the expert choices that were waiting on the lost rank;
3. requests: the lost rank's requests are re-admitted on the least-loaded survivors with the
   prompt plus every token already streamed, so a client's stream simply continues.
"""

from __future__ import annotations

import collections
import itertools
from collections import Counter
import logging
import queue
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import ResilienceConfig, refuse_unsupported
from ..membership import Membership, RankState
from ..metrics import InstanceMetrics
from ..liveness import LivenessTracker, RankLoss
from ..placement import place
from ..recovery import RecoveryOrchestrator
from ..repair import HostBackup, candidates
from ..repair.host_backup import default_root
from ..shadow import plan_shadows, residual_bytes, shadow_slots_for_memory
from ..transport import curve, wire
from ..transport.monitors import close_monitored, monitor_socket
from .kv_checkpointing import KVTracker
from .model import MoEConfig
from ..liveness.datagrams import BeaconReceiver
from .hosts import Launcher, RankHosts
from .rank_processes import RankProcesses, RuntimeStartError
from .requests import RequestRecord

log = logging.getLogger(__name__)

DEFAULT_REDUNDANT_SLOTS = 1
"""``placement.redundant_slots_per_rank`` when the config leaves it to the engine (null)."""

UNSUPPORTED: dict[str, str] = {
    "recovery.respawn": "the reference runtime rejoins a rank on Coordinator.rejoin(rank)",
    "recovery.rejoin_start_timeout_s": "the reference runtime starts no replacement process "
                                       "(Coordinator.rejoin(rank) restarts the rank's own)",
}
"""Settings the reference runtime does not read: refused at start, never ignored."""

KEEP_STEPS = 100_000
"""Steps of the timeline kept (``Coordinator.steps``; the oldest go past twice that)."""
KEEP_FINISHED = 10_000
"""Finished requests kept in ``Coordinator.requests`` (the oldest are forgotten)."""

__all__ = ["Coordinator", "RequestRecord", "FailureEvent", "RuntimeStartError"]


@dataclass
class FailureEvent:
    rank: int
    kind: str                    # "crash" | "hang"
    detected_at: float           # time.time()
    epoch: int
    injected_at: float | None = None
    migrated: int = 0
    uncovered: list = field(default_factory=list)
    stall_s: float | None = None  # Coordinator.recovery_stall, once known


class Coordinator:
    def __init__(self, model_dir: str | Path, *, num_ranks: int = 4,
                 config: ResilienceConfig | None = None, resilience: bool = True,
                 kv_blocks: int = 512, block_size: int = 16, run_dir: str | Path | None = None,
                 start_timeout_s: float = 120.0, fail_at: dict[int, dict] | None = None,
                 exact: bool = True, poison_token: int | None = None,
                 launcher: Launcher | None = None):
        self.model_dir = str(model_dir)
        self.num_ranks = num_ranks
        self.config = config or ResilienceConfig()
        refuse_unsupported(self.config, "the reference runtime",  # no setting ignored
                           UNSUPPORTED)
        self.resilience = resilience and self.config.enabled
        self.kv_blocks, self.block_size = kv_blocks, block_size
        self.start_timeout_s = start_timeout_s
        self.exact = exact
        """Bit-exact mode (batch-invariant kernels): outputs independent of batching and of
        migration. Off: faster batched attention, outputs equal only up to rounding."""
        self.fail_at = dict(fail_at or {})
        """Failure injection per rank: ``{rank: {"point", "step", "signal"}}`` (see rank.FAIL_POINTS)."""
        self.poison_token = poison_token
        """Failure injection: a request starting with this token id kills each rank it runs
        on (a poison request, for ``recovery.max_request_failures``)."""
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="rep-"))
        mcfg = MoEConfig.from_dir(self.model_dir)
        self.num_layers, self.num_experts = mcfg.num_layers, mcfg.num_experts
        self.vocab_size = mcfg.vocab_size
        if num_ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {num_ranks}")
        base = -(-self.num_experts // num_ranks)
        redundant = self.config.placement.redundant_slots_per_rank
        self.slots_per_rank = base + (DEFAULT_REDUNDANT_SLOTS if redundant is None else redundant)
        self.hosts = RankHosts(self.config, num_ranks, self.run_dir, launcher)
        """Where the ranks run: one host, or the nodes of ``transport.node_addresses``."""
        if self.hosts.multi:
            nodes = self.hosts.num_nodes  # replicas of an expert on distinct nodes
        else:
            nodes = max(1, num_ranks // self.config.placement.ranks_per_node)
            if num_ranks % nodes:
                nodes = 1
        self.layout = place(num_layers=self.num_layers, num_experts=self.num_experts,
                            num_ranks=num_ranks, slots_per_rank=self.slots_per_rank,
                            num_nodes=nodes, fault_aware=self.config.placement.fault_aware,
                            max_balancedness_loss=self.config.placement.max_balancedness_loss)
        self.shadow_slots = 0
        """Shadow slots per rank (``shadow.*``), after the regular ones."""
        shadow_mask = None
        if self.config.shadow.enabled:
            sc = self.config.shadow
            per_expert = (3 * mcfg.hidden_size * mcfg.moe_intermediate_size * 4
                          * self.num_layers)  # fp32 gate, up, down over every layer
            self.shadow_slots = shadow_slots_for_memory(
                residual_bytes() / num_ranks, sc.memory_fraction, per_expert,
                max_slots=sc.max_slots_per_rank,
                free_experts=self.num_experts - min(self.slots_per_rank, self.num_experts))
            shadows = plan_shadows(self.layout, self.shadow_slots)
            self.layout, shadow_mask = shadows.layout, shadows.shadow_mask()
            self.slots_per_rank += self.shadow_slots
        self.membership = Membership(num_ranks)
        self.kv = KVTracker(self.config.kv_checkpoint, num_ranks, self.run_dir,
                            enabled=self.resilience and self.config.kv_checkpoint.enabled)
        """KV checkpoints: per-request records (``kv.requests``) and metrics."""
        self.recovery = RecoveryOrchestrator(
            self.membership, self.layout, self.config, shadow_mask=shadow_mask,
            rank_nodes={r: self.hosts.node_of(r) for r in range(num_ranks)}
            if self.hosts.multi else None)
        self.uncovered: list[tuple[int, int]] = []
        self.requests: dict[str, RequestRecord] = {}
        self.failures: list[FailureEvent] = []
        self._repairing: list[list[int]] = []  # (layer, expert)s a repair is bringing back
        self.poisoned: list[dict] = []
        """Requests failed by ``recovery.max_request_failures``: rid, deaths, ranks."""
        self.joins: list[dict] = []          # {"rank", "t", "epoch"} per admitted rank
        self.repairs: list[dict] = []        # {"epoch", "t0", "t1", "moves"} per weight repair
        self._repairs_pending: set[int] = set()
        self.host_backup: HostBackup | None = None
        """Every expert once in shared memory (``repair.host_backup``), written by the ranks
        after they load; the first repair source after a rank's own memory."""
        if self.config.repair.host_backup:
            self.host_backup = HostBackup(default_root(f"ref-{self.run_dir.name}"))
        self._warm: set[int] = set()  # fenced ranks being taken back as they are
        self._layout_version = 0
        self.steps: list[dict] = []          # per-step timeline from every rank (recent)
        self._finished: collections.deque[str] = collections.deque()
        self.ranks = RankProcesses(num_ranks, self.run_dir, control=self.hosts.control_endpoint,
                                   prefix=self.hosts.prefix, spec_of=self.hosts.rank_liveness)
        self.beacons: BeaconReceiver | None = None
        """Several hosts: the heartbeat datagram socket (leases go out of it)."""
        self._ids = itertools.count()
        self._inject: dict[int, float] = {}
        self._calls: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self.key: bytes | None = None
        """This instance's key (``transport.authenticate``): CURVE derives every socket's keys
        from it (``transport.curve``), or every message is tagged with it."""
        self._curve_key: bytes | None = None
        self._tag_key: bytes | None = None
        self.dropped: Counter[str] = Counter()
        """Control messages dropped, by reason (``wire.WireError.reason`` or ``content``)."""
        self.rank_dropped: dict[int, dict[str, int]] = {}
        self.rank_lease: dict[int, dict[str, int]] = {}
        """Several hosts, per rank: ``expiries`` (its lease ran out), ``discarded_steps``
        (computed without a lease, never emitted) and ``expired_at`` (``time.time()`` of the
        last expiry), as last reported."""
        """What each rank reported dropping (``control/<reason>``, ``data/<reason>``)."""
        self.ctx = zmq.Context()

    @property
    def procs(self) -> list:
        """The rank processes (``subprocess.Popen``), by rank."""
        return self.ranks.procs

    @property
    def pids(self) -> list[int]:
        return self.ranks.pids

    # ================================================================== lifecycle
    def start(self) -> "Coordinator":
        """Start the ranks and the loop. On failure (a rank that does not come up) everything
        started so far is stopped and closed before the error is raised: nothing is left
        behind to block the interpreter's exit."""
        try:
            return self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> "Coordinator":
        det = self.config.detector
        shared = self.config.transport.key_file  # several hosts: one file every node has
        key_file = Path(shared) if shared else self.run_dir / "instance.key"
        if self.config.transport.authenticate and shared:
            try:
                self.key = wire.new_key_file(key_file)
            except FileExistsError:
                self.key = wire.load_key(key_file)
        elif self.config.transport.authenticate:
            key_file.unlink(missing_ok=True)  # a run dir given twice: a fresh key each start
            self.key = wire.new_key_file(key_file)
        # CURVE (keys derived from the instance key) or, without it, an HMAC tag per message.
        curve_on = (self.key is not None and self.config.transport.curve
                    and curve.available())
        self._curve_key = self.key if curve_on else None
        self._tag_key = None if curve_on else self.key
        data = self.hosts.data_endpoints()
        ckey = self._curve_key
        self.hb = curve.server(self.ctx.socket(zmq.PULL), key=ckey)
        self.hb.setsockopt(zmq.LINGER, 0)
        hb_ep = self.hosts.heartbeat_endpoint()
        self.hb.bind(hb_ep)
        if self.hosts.multi:  # heartbeats and leases between hosts: datagrams
            self.beacons = BeaconReceiver(self.hosts.liveness_bind(), range(self.num_ranks),
                                          key=self.key)
        self.kv.set_peers(self.hosts.kv_endpoints(), self.hosts.kv_nodes())
        self.wake_rx = self.ctx.socket(zmq.PAIR)
        self.wake_rx.bind(f"inproc://wake-{id(self)}")
        self.wake_tx = self.ctx.socket(zmq.PAIR)
        self.wake_tx.connect(f"inproc://wake-{id(self)}")
        self.ctl: list[zmq.Socket] = []
        self.mon: list[zmq.Socket] = []
        self.ranks.spec_base = {
            "num_ranks": self.num_ranks, "model_dir": self.model_dir,
            "data": data, "layout": self.layout.physical_to_logical.tolist(),
            "route_layout": self.recovery.layout.physical_to_logical.tolist(),
            "num_experts": self.num_experts, "max_replicas": self.layout.max_replicas,
            "resilience": self.resilience, "heartbeat_interval_ms": det.heartbeat_interval_ms,
            "step_timeout_s": max(self.config.transport.step_timeout_ms / 1000.0, 1.0) * 30,
            "on_uncovered": self.config.recovery.on_uncovered,
            "kv_blocks": self.kv_blocks, "block_size": self.block_size, "threads": 1,
            "exact": self.exact, "kv_checkpoint": self.kv.rank_spec(),
            "key_file": str(key_file) if self.key is not None else None,
            "poison_token": self.poison_token, "curve": self.config.transport.curve,
            "connect_timeout_s": self.start_timeout_s,
            "host_backup": str(self.host_backup.root) if self.host_backup else None,
        }
        for r in range(self.num_ranks):
            spec = self.ranks.spawn(r, fail_at=self.fail_at.get(r))
            s = curve.client(self.ctx.socket(zmq.PAIR), key=ckey)
            s.setsockopt(zmq.LINGER, 0)
            self.mon.append(monitor_socket(s, zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED))
            s.connect(spec["control"])
            self.ctl.append(s)
        self.ranks.await_ready(self.ctl, self.start_timeout_s, key=self._tag_key)
        self.liveness = LivenessTracker(self.membership, range(self.num_ranks),
                                        detector=self.config.detector, out_at_fence=True,
                                        key=self._tag_key)
        for r in range(self.num_ranks):  # each rank is watched from its "ready" on
            self.liveness.watch(r)
        self._thread = threading.Thread(target=self._loop, name="rep-coordinator", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._thread is not None:
            self._call(("shutdown",))
            self._thread.join(timeout)
        self.ranks.wait(timeout)
        self.ranks.kill_all()
        ctl, mon = getattr(self, "ctl", []), getattr(self, "mon", [])
        for i, s in enumerate(ctl):  # each monitor stopped before either end closes
            close_monitored(s, mon[i] if i < len(mon) else None)
        for s in [*mon[len(ctl):], getattr(self, "hb", None), getattr(self, "wake_rx", None),
                  getattr(self, "wake_tx", None)]:
            if s is not None:
                s.close(linger=0)
        if self.beacons is not None:
            self.beacons.close()
        self.ctx.term()
        self.kv.cleanup()
        if self.host_backup is not None:
            self.host_backup.remove()
        if self._own_dir:
            for f in self.run_dir.glob("*"):
                f.unlink(missing_ok=True)
            try:
                self.run_dir.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ================================================================== public calls
    def submit(self, prompt: list[int], max_tokens: int, *, eos: int | None = None,
               rid: str | None = None, on_event=None) -> RequestRecord:
        """Queue a request; returns its record at once (``wait`` / ``stream`` on it, or
        ``on_event(kind, value)`` called from the coordinator's thread per token and at the
        end)."""
        if not prompt:
            raise ValueError("prompt must not be empty")
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad!r} is not an integer in the vocabulary "
                             f"[0, {self.vocab_size})")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        rec = RequestRecord(rid or f"req-{next(self._ids)}", list(prompt), max_tokens, eos,
                            submitted_at=time.time(), on_event=on_event)
        self._call(("submit", rec))
        return rec

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> float:
        """Inject a failure (SIGKILL: crash; SIGSTOP: hang). Returns the injection time."""
        t = time.time()
        self._inject[rank] = t
        self.ranks.send_signal(rank, sig)
        return t

    def mark_injected(self, ranks, t: float | None = None) -> float:
        """Record that a failure of ``ranks`` was injected at ``t`` (``time.time()``; now by
        default) from outside (a node killed, a cable cut): their :class:`FailureEvent`
        then carries it, and ``recovery_stall`` counts from it."""
        t = time.time() if t is None else t
        for r in ranks:
            self._inject[int(r)] = t
        return t

    def rejoin(self, rank: int, timeout: float = 120.0) -> float:
        """Take a failed rank back without a restart: a fresh process for it loads its
        weights and connects in the background (state ``joining``), then the live ranks admit
        it with one table flip between two steps. Returns the seconds until admitted."""
        state = self.membership.state(rank)
        if state is RankState.LIVE:
            raise ValueError(f"rank {rank} is live: nothing to rejoin")
        if state is RankState.JOINING:
            raise ValueError(f"rank {rank} is already joining")
        self.ranks.ensure_gone(rank)  # a fenced rank may still be around: make sure it is gone
        self._warm.discard(rank)
        t0 = time.time()
        view = self.membership.begin_join([rank])
        self.ranks.spawn(rank, membership={"epoch": view.epoch,
                                           "states": [s.value for s in view.states]},
                         route_layout=self.recovery.layout.physical_to_logical.tolist())
        proc = self.ranks.procs[rank]
        end = time.monotonic() + timeout
        while not any(j["rank"] == rank and j["t"] >= t0 for j in self.joins):
            if proc.poll() is not None:
                raise RuntimeError(f"rank {rank} exited with code {proc.returncode} while joining")
            if time.monotonic() > end:
                raise TimeoutError(f"rank {rank} not admitted within {timeout} s")
            time.sleep(0.01)
        return max(j["t"] for j in self.joins if j["rank"] == rank) - t0

    def status(self) -> dict:
        view = self.membership.view()
        with self._lock:
            uncovered = [list(x) for x in self.uncovered]
        return {"epoch": view.epoch,
                "ranks": [{"rank": r, "pid": self.pids[r], "state": s.value}
                          for r, s in enumerate(view.states)],
                "uncovered_experts": uncovered,
                "poisoned_requests": list(self.poisoned),
                "kv_checkpoint": self.kv.status(live=set(view.live_ranks)),
                "experts": self._experts_status(),
                "hosts": {**self.hosts.describe(),
                          "lease": {str(r): v for r, v in self.rank_lease.items()},
                          "datagrams_dropped": dict(self.beacons.dropped) if self.beacons else {}}}

    def _experts_status(self) -> dict:
        """Slots, shadows (held, and serving now), repairs by source."""
        mask = self.recovery.shadow_mask
        routed = self.recovery.layout.physical_to_logical
        active_shadows = int(((routed >= 0) & mask).sum()) if mask is not None else 0
        sources: Counter[str] = Counter()
        for r in self.repairs:
            sources.update(r.get("sources", {}))
        return {"slots_per_rank": self.slots_per_rank, "shadow_slots_per_rank": self.shadow_slots,
                "active_shadows": active_shadows, "repairs": len(self.repairs),
                "copies_by_source": dict(sources),
                "host_backup": str(self.host_backup.root) if self.host_backup else None}

    def cancel(self, rid: str) -> None:
        """Stop a request (its client went away): its rank drops it, its record finishes
        with an error ``cancelled``. A finished or unknown request is left alone."""
        self._call(("cancel", rid))

    def metrics(self) -> InstanceMetrics:
        """This instance's numbers for Prometheus (``resilient_ep.metrics``)."""
        view = self.membership.view()
        failovers: Counter[str] = Counter()
        for f in list(self.failures):
            failovers[f.kind] += 1
            if f.stall_s is None:
                f.stall_s = self.recovery_stall(f)
        events = list(self.failures)
        rejected: Counter[tuple[str, str]] = Counter()
        for reason, n in self.dropped.items():
            rejected["coordinator", reason] += n
        for reason, n in self.liveness.dropped.items():
            rejected["liveness", reason] += n
        for per_rank in list(self.rank_dropped.values()):
            for what, n in per_rank.items():
                where, _, reason = what.partition("/")
                rejected[f"rank-{where}", reason] += n
        kv = self.kv.status(live=set(view.live_ranks))
        with self._lock:
            uncovered = len(self.uncovered)
        experts = self._experts_status()
        return InstanceMetrics(
            engine="reference", ranks=self.num_ranks, live_ranks=len(view.live_ranks),
            epoch=view.epoch, uncovered_experts=uncovered, failovers=dict(failovers),
            detection_s=[f.detected_at - f.injected_at for f in events
                         if f.injected_at is not None],
            stall_s=[f.stall_s for f in events if f.stall_s is not None],
            rejected=dict(rejected), requests_migrated=sum(f.migrated for f in events),
            poisoned_requests=len(self.poisoned), kv_restores=int(kv.get("restores", 0)),
            restored_tokens=int(kv.get("restored_tokens", 0)),
            recomputed_tokens=int(kv.get("recomputed_tokens", 0)),
            kv_checkpoint_lag_tokens=float(kv.get("lag_tokens_max", 0)),
            repair_copies=dict(experts["copies_by_source"]),
            repairing_experts=len(self._repairing),
            active_shadows=int(experts["active_shadows"]))

    def set_kv_checkpointing(self, enabled: bool) -> None:
        """Pause or resume KV checkpointing on every rank (benchmarks: on vs off in one run)."""
        self._call(("kv", enabled))

    def errored(self) -> BaseException | None:
        return self._error

    def _call(self, item) -> None:
        self._calls.put(item)
        try:
            self.wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ================================================================== the loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        for s in (*self.ctl, *self.mon, self.hb, self.wake_rx):
            poller.register(s, zmq.POLLIN)
        if self.beacons is not None:
            poller.register(self.beacons.fileno(), zmq.POLLIN)
        tick = max(1.0, self.config.detector.heartbeat_interval_ms / 5)
        try:
            while True:
                events = dict(poller.poll(tick))
                if self.wake_rx in events:
                    while self.wake_rx.poll(0):
                        self.wake_rx.recv()
                while True:
                    try:
                        call = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if call[0] == "shutdown":
                        self._broadcast({"t": "shutdown"})
                        return
                    if call[0] == "submit":
                        self._admit(call[1])
                    if call[0] == "cancel":
                        self._cancel(call[1])
                    if call[0] == "kv":
                        self._broadcast({"t": "kv", "paused": not call[1]})
                for r, s in enumerate(self.ctl):
                    if s in events:
                        while s.poll(0):
                            self._on_control_frame(r, s.recv())
                if self.hb in events:
                    while self.hb.poll(0):
                        got = self.liveness.beacon(self.hb.recv())
                        if got is not None and got[0] == "alive":
                            self._on_alive(got[1], got[2])
                if self.beacons is not None and self.beacons.fileno() in events:
                    self._on_datagrams()
                for r, m in enumerate(self.mon):  # read even when unused (``monitors``)
                    if m in events:
                        while m.poll(0):
                            if (recv_monitor_message(m)["event"] == zmq.EVENT_DISCONNECTED
                                    and self.resilience):
                                self.liveness.disconnected(r)
                if not self.resilience:
                    continue
                self._on_losses(self.liveness.poll())
        except BaseException as e:  # surfaced through errored(); requests are failed below
            self._error = e
            for rec in list(self.requests.values()):
                if not rec.finished:
                    self._finish(rec, error=f"runtime error: {e!r}")

    def _on_alive(self, rank: int, pid: int) -> None:
        """Rank ``rank`` (process ``pid``) says it is alive: a fenced one is taken back."""
        if (self.resilience and self.membership.state(rank) is RankState.FENCED
                and pid == self.pids[rank] and self.config.recovery.readmit_fenced):
            self._readmit(rank)

    def _on_datagrams(self) -> None:
        """Heartbeats from other hosts: each is a beacon, and earns its sender a lease while
        it is a live member (a fenced rank gets none until it is taken back)."""
        now = time.monotonic()
        for rank, pid, seq, boot, addr in self.beacons.receive():
            if pid != self.pids[rank]:
                continue  # an old process of the rank (it was replaced)
            self.liveness.alive(rank, now)
            if self.membership.state(rank) is RankState.LIVE:
                self.beacons.grant(rank, seq, boot, addr)
            else:
                self._on_alive(rank, pid)

    # ------------------------------------------------------------------ requests
    def _live_load(self) -> dict[int, int]:
        load = {r: 0 for r in self.membership.view().live_ranks}
        for rec in self.requests.values():
            if not rec.finished and rec.owner in load:
                load[rec.owner] += 1
        return load

    def _admit(self, rec: RequestRecord, target: int | None = None) -> None:
        self.requests[rec.rid] = rec
        if target is None:
            load = self._live_load()
            if not load:
                self._finish(rec, error="no live rank")
                return
            target = min(load, key=lambda r: (load[r], r))
        rec.owner = target
        msg = {"t": "add", "rid": rec.rid, "tokens": rec.prompt + rec.generated,
               "max_new": rec.max_tokens - len(rec.generated), "eos": rec.eos}
        if rec.migrations:  # moved after a failure: resume from its KV checkpoint if one survives
            msg["restore"] = self.kv.restore_hint(rec.rid, len(msg["tokens"]))
        self._send(rec.owner, msg)

    def _on_control_frame(self, rank: int, raw: bytes) -> None:
        """One message on rank ``rank``'s control socket: decoded and checked, or dropped and
        counted by reason (``self.dropped``); a message that breaks its handler is dropped
        too (``content``), never the loop."""
        try:
            msg = wire.decode_header(raw, key=self._tag_key)
            if not isinstance(msg.get("t"), str):
                raise wire.WireError("header", "no message type")
            self._on_rank_message(rank, msg)
        except wire.WireError as e:
            self.dropped[e.reason] += 1
        except wire.BAD_CONTENT:
            self.dropped["content"] += 1
            log.warning("resilient-ep: a control message of rank %d was dropped", rank,
                        exc_info=True)

    def _on_rank_message(self, rank: int, msg: dict) -> None:
        if msg["t"] == "ready" and self.membership.state(rank) is RankState.JOINING:
            self._on_join(rank)
            if self.joins and self.joins[-1].get("rank") == rank and "loaded_from" in msg:
                self.joins[-1]["loaded_from"] = msg["loaded_from"]  # host backup or disk
            return
        if msg["t"] == "repaired":
            self._on_repaired(rank, msg)
            return
        if msg["t"] != "tokens":
            return
        if isinstance(msg.get("lease"), dict):  # several hosts: how often its lease ran out
            self.rank_lease[rank] = {str(k): v for k, v in msg["lease"].items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.membership.state(rank) is not RankState.LIVE:
            self.dropped["non_member"] += 1  # a fenced rank woke up: not ours any more
            return
        if msg.get("dropped"):
            self.rank_dropped[rank] = {str(k): int(v) for k, v in msg["dropped"].items()}
        if msg.get("kv"):
            self.kv.on_report(rank, msg["kv"], lambda rid: getattr(self.requests.get(rid), "owner", None))
        self.steps.append({k: msg[k] for k in ("rank", "step", "epoch", "epoch_start", "t0", "t1",
                                                 "num_tokens")})
        if len(self.steps) > 2 * KEEP_STEPS:  # a server runs for days: keep the recent ones
            del self.steps[:-KEEP_STEPS]
        for rid, tok, fin, note in msg["items"]:
            rec = self.requests.get(rid)
            if rec is None or rec.finished or rec.owner != rank:
                continue
            if note == "uncovered":
                self._finish(rec, error="needs expert(s) without a live replica and "
                                        "recovery.on_uncovered=fail; uncovered (layer, expert): "
                                        f"{self.status()['uncovered_experts']}")
                continue
            if note == "degraded":
                rec.degraded = True
            rec.add_token(tok)
            if fin:
                self._finish(rec)

    def _cancel(self, rid: str) -> None:
        rec = self.requests.get(rid)
        if rec is None or rec.finished:
            return
        if rec.owner >= 0 and self.membership.state(rec.owner) is RankState.LIVE:
            self._send(rec.owner, {"t": "drop", "rid": rid})
        self._finish(rec, error="cancelled")

    def _finish(self, rec: RequestRecord, error: str | None = None) -> None:
        rec.finish(error)
        self._finished.append(rec.rid)
        while len(self._finished) > KEEP_FINISHED:  # forget the oldest finished requests
            self.requests.pop(self._finished.popleft(), None)

    # ------------------------------------------------------------------ recovery
    def _on_losses(self, losses: list[RankLoss]) -> None:
        """The authority recorded these losses (one epoch): plan and carry out the recovery."""
        for kind in ("crash", "hang"):
            ranks = [x.rank for x in losses if x.kind == kind]
            if ranks:
                self._on_failure(ranks, kind)

    def _on_failure(self, ranks: list[int], kind: str) -> None:
        # A repair target lost mid-copy never reports: the replan below repairs again what
        # it was bringing back, and the layout flip no longer waits for it.
        self._repairs_pending -= set(ranks)
        self._warm -= set(ranks)
        live = {rid: rec for rid, rec in self.requests.items() if not rec.finished}
        plan = self.recovery.on_failure(ranks, kind, {rid: r.owner for rid, r in live.items()},
                                        deaths={rid: r.migrations for rid, r in live.items()})
        if plan is None:
            return
        now = time.time()
        with self._lock:
            self.uncovered = list(plan.uncovered)
        self._layout_version += 1
        repair = bool(plan.replan.moves)
        self._repairing = [[m.layer, m.expert] for m in plan.replan.moves] if repair else []
        msg = {"t": "membership", "epoch": plan.view.epoch, "version": self._layout_version,
               "states": [s.value for s in plan.view.states],
               "layout": plan.layout.physical_to_logical.tolist(), "repairing": self._repairing}
        self._broadcast(msg, include=list(ranks))  # a fenced rank learns it is out, if it wakes
        if repair:
            self._start_repair(plan.replan.moves, plan.view.epoch)
        for rid, target in plan.migrations.items():
            rec = self.requests[rid]
            rec.owners.append(rec.owner)
            rec.migrations += 1
            self._admit(rec, target)
        limit = self.config.recovery.max_request_failures
        for rid in plan.exhausted:
            rec = self.requests[rid]
            self.poisoned.append({"rid": rid, "deaths": rec.migrations + 1,
                                  "ranks": [*rec.owners, rec.owner]})
            self._finish(rec, error=f"request {rid} was in flight at {rec.migrations + 1} rank "
                                    f"deaths (recovery.max_request_failures={limit}); it may "
                                    "be what kills them, so it is not moved again")
        for rid in plan.abandoned:
            self._finish(self.requests[rid], error=f"rank {self.requests[rid].owner} failed "
                                                   "and the request could not be moved")
        for r in plan.failed:
            self.failures.append(FailureEvent(r, kind, now, plan.view.epoch, self._inject.pop(r, None),
                                              len(plan.migrations), list(plan.replan.uncovered)))

    def _start_repair(self, moves, epoch: int) -> None:
        """Restore coverage: take the target slots out of routing, have their owners load the
        lost experts from the checkpoint on disk, then route by the repaired layout."""
        self._flip_layout(self.recovery.vacate(moves), epoch)
        by_rank: dict[int, list] = {}
        live = self.membership.view().live_ranks
        backup = self.host_backup
        for m in moves:
            target = m.slot // self.slots_per_rank
            # Where the rank may read it, cheapest first (the core's order, repair.sources):
            # its own memory, the host backup, the model files. A peer never holds an expert
            # that lost every copy.
            srcs = [c.kind for c in candidates(
                self.recovery.physical, m.layer, m.expert, target, live_ranks=live,
                sources=self.config.repair.sources, exclude_slots=[m.slot],
                host_has=(lambda l, e: backup.has(str(l), e)) if backup else None)
                if c.kind in ("shadow", "host", "disk")]
            by_rank.setdefault(target, []).append((m.layer, m.slot, m.expert, m.evicted, srcs))
        for r, ms in by_rank.items():
            self._send(r, {"t": "repair", "moves": ms})
        self._repairs_pending |= set(by_rank)
        self.repairs.append({"epoch": epoch, "t0": time.time(), "moves": len(moves),
                             "t1": None, "sources": {}})

    def _on_repaired(self, rank: int, msg: dict) -> None:
        from ..placement import SlotMove
        moves = [SlotMove(*m[:4]) for m in msg["moves"]]
        if self.repairs:
            used = self.repairs[-1].setdefault("sources", {})
            for m in msg["moves"]:
                src = m[4] if len(m) > 4 else "disk"
                used[src] = used.get(src, 0) + 1
        layout = self.recovery.repaired(moves)
        self._repairs_pending.discard(rank)
        if not self._repairs_pending:
            self._repairing = []
            self._flip_layout(layout, self.membership.epoch)
            with self._lock:
                self.uncovered = sorted(self.recovery.uncovered)
            if self.repairs and self.repairs[-1]["t1"] is None:
                self.repairs[-1]["t1"] = time.time()

    def _flip_layout(self, layout, epoch: int) -> None:
        self._layout_version += 1
        self._broadcast({"t": "layout", "epoch": epoch, "version": self._layout_version,
                         "layout": layout.physical_to_logical.tolist(),
                         "repairing": self._repairing})

    def _readmit(self, rank: int) -> None:
        """A fenced rank is heartbeating again: take it back (weights still loaded)."""
        self.membership.begin_join([rank])
        self._warm.add(rank)
        self._send(rank, {"t": "rejoin"})

    def _on_join(self, rank: int) -> None:
        # A fenced rank taken back holds what it held (repaired copies included); a fresh
        # process for a rank (rejoin) loaded its initial slots.
        warm = rank in self._warm
        self._warm.discard(rank)
        plan = self.recovery.on_join([rank], reloaded=not warm)
        with self._lock:
            self.uncovered = list(plan.uncovered)
        self.liveness.watch(rank)
        self._layout_version += 1
        self._broadcast({"t": "membership", "epoch": plan.view.epoch, "version": self._layout_version,
                         "states": [s.value for s in plan.view.states],
                         "layout": plan.layout.physical_to_logical.tolist()})
        self.joins.append({"rank": rank, "t": time.time(), "epoch": plan.view.epoch})

    def _send(self, rank: int, msg: dict) -> None:
        try:
            self.ctl[rank].send(wire.encode_header(msg, key=self._tag_key), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _broadcast(self, msg: dict, include: list[int] = ()) -> None:
        for r in range(self.num_ranks):
            if self.membership.state(r) is RankState.LIVE or r in include:
                self._send(r, msg)

    # ================================================================== measurements
    def recovery_stall(self, event: FailureEvent) -> float | None:
        """Seconds from the injected failure until every survivor that was serving has
        completed a step after the failure was handled (its rerouted step, or a later one).
        None until that has happened. Without an injection time, measured from detection."""
        t_inj = event.injected_at if event.injected_at is not None else event.detected_at
        lost = {f.rank for f in self.failures if f.epoch <= event.epoch}
        survivors = {s["rank"] for s in self.steps if s["t1"] > t_inj - 1.0} - lost
        firsts = []
        for r in survivors:
            after = [s["t1"] for s in self.steps if s["rank"] == r and s["t1"] >= event.detected_at]
            if not after:
                return None
            firsts.append(min(after))
        return (max(firsts) - t_inj) if firsts else None

