"""The front end's half of a rejoin: :class:`Rejoiner` starts a replacement engine core for a
lost DP rank, brings it up, checks it, and has the authority admit it.

A rejoin goes through these states (``GET /resilience/status``, ``rejoins``):

- ``exporting`` (when a peer supplies the weights, ``repair.sources``): every survivor writes
  the experts the replacement will hold from its memory into a directory of the node's shared
  memory, between two steps (skipped when the node's host backup holds every expert);
- ``joining``: the replacement process is started (vLLM's own engine-core entry point, with
  ``RESILIENT_EP_REJOIN`` so it forms its world alone and runs solo, ``joining.py``) and
  watched by the liveness monitor: its death from here on is a loss like any other;
- ``warming``: it said HELLO on a handshake socket of its own and got the addresses every
  engine got at the start (front-end sockets, DP coordinator); it loads its weights (its
  experts from the survivors' export or the host backup when one of them has every expert it
  holds, else from the model files; the dense weights from the model files) and runs vLLM's
  warm-up and compile passes, alone;
- ``verifying``: it is READY; its dense weights' digest must equal a survivor's and every
  expert slot it holds must equal the node's host backup (or the model files), bitwise;
- ``live``: the authority admitted it (one epoch, published); every engine core switched to
  the join's groups at the same step, and new requests go to it. ``failed``: any step failed;
  the replacement is stopped, the rank stays lost, the instance serves on.

One rejoin at a time (a second one waits its turn). Started by
``POST /resilience/ranks/{rank}/rejoin`` or, with ``recovery.respawn``, on every loss.

The :class:`Rejoiner` runs where the engine cores were started and the membership authority
runs (its :class:`RejoinHost`): in the API server with ``--api-server-count 1``
(:class:`~.rejoin_hosts.ClientHost`), in the ``vllm serve`` launcher with several API servers,
vLLM's default for DP (:class:`~.rejoin_hosts.LauncherHost`: the launcher has no engine
client, so it calls the engines through an API server's relay, and the API servers hand it
their rejoin requests, ``rejoin_relay.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any, Protocol

from resilient_ep.repair import HostBackup

__all__ = ["Rejoiner", "RejoinError", "EngineLost", "RejoinHost", "STATES",
           "run_replacement_engine_core", "respawn"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler

STATES = ("exporting", "joining", "warming", "verifying", "live", "failed")
START_ATTEMPTS = 2
"""A replacement not READY within ``recovery.rejoin_start_timeout_s`` of its start (about
25 s on a 2-core machine, 35 s with torch.compile) is stopped and started again, this many
starts in all."""
SWITCH_TIMEOUT_S = 120.0
RPC_TIMEOUT_S = 60.0


def run_replacement_engine_core(**kwargs) -> None:
    """A replacement engine core's process entry point: vLLM's own (``EngineCoreProc.
    run_engine_core``), with the plugins loaded first (vLLM loads them only inside
    ``EngineCore.__init__``, after the DP group a replacement must not form)."""
    from vllm.plugins import load_general_plugins
    from vllm.v1.engine.core import EngineCoreProc

    from .patches import engine_rejoin

    load_general_plugins()  # also in its workers: plugin.register (stacks on SIGUSR1)
    engine_rejoin.check()
    engine_rejoin.apply()
    EngineCoreProc.run_engine_core(**kwargs)


class RejoinError(RuntimeError):
    """A rejoin that cannot start (bad rank, rank not lost, wrong topology)."""


class EngineLost(RuntimeError):
    """The engine a call went to was lost before it answered."""


class StartTimeout(TimeoutError):
    """The replacement did not reach READY in time, or did not answer the checks after it
    (it is stopped; the rejoin may retry)."""


class RejoinHost(Protocol):
    """What a :class:`Rejoiner` needs of the process it runs in (``rejoin_hosts.py``)."""

    vllm_config: Any
    manager: Any
    """vLLM's ``CoreEngineProcManager`` that started the engine cores (patched by
    ``vllm-engine-manager-failover`` to keep their start arguments and addresses)."""
    monitor: Any
    """The instance's :class:`~resilient_ep.liveness.LivenessMonitor` (the authority)."""
    rank_procs: Any
    """The monitor's :class:`~.fencing.RankProcesses` (a replacement is fenced like any)."""
    num_ranks: int

    def dead(self) -> set[int]:
        """DP ranks not live now (lost, or joining)."""

    def call(self, engine: int, utility: str, args: tuple, timeout_s: float, *,
             watch_loss: bool = True) -> Any:
        """An engine-core utility call on DP rank ``engine`` (``collective_rpc`` or one of
        ours), its result; given up on (``RuntimeError``) as soon as the engine is lost with
        ``watch_loss``, or after ``timeout_s`` (``TimeoutError``)."""

    def rejoined(self, rank: int, epoch: int) -> None:
        """``rank`` joined at ``epoch``."""


class Rejoiner:
    def __init__(self, host: RejoinHost):
        self.host = host
        self.rejoins: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._queue: list[int] = []
        self._thread: threading.Thread | None = None
        self._spawn_lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def request(self, rank: int, reason: str = "api") -> dict[str, Any]:
        """Queue a rejoin of the lost DP ``rank``; returns its record (state ``joining`` or
        ``queued``). Raises :class:`RejoinError` for one that cannot be done."""
        h = self.host
        size = h.num_ranks
        if not 0 <= rank < size:
            raise RejoinError(f"rank {rank} is not a DP rank of this instance (0..{size - 1})")
        if getattr(h.manager, "_resilient_addresses", None) is None:
            raise RejoinError("the engine start-up addresses were not recorded "
                              "(vllm-engine-manager-failover patch not applied)")
        with self._lock:
            if rank not in h.dead():
                raise RejoinError(f"rank {rank} is live: nothing to rejoin")
            if rank in self._queue or any(r["rank"] == rank and r["state"] in
                                          ("exporting", "joining", "warming", "verifying")
                                          for r in self.rejoins):
                raise RejoinError(f"rank {rank} is already rejoining")
            record = {"rank": rank, "state": "queued", "reason": reason, "pid": None,
                      "requested_monotonic": time.monotonic(), "error": None, "epoch": None}
            self.rejoins.append(record)
            self._queue.append(rank)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, daemon=True,
                                                name="resilient-ep-rejoin")
                self._thread.start()
        return public(record)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [public(r) for r in self.rejoins]

    def _worker(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                rank = self._queue.pop(0)
                record = next(r for r in reversed(self.rejoins) if r["rank"] == rank)
            try:
                self._rejoin(rank, record)
            except Exception as e:  # the rank stays lost; the instance serves on
                log.exception("resilient-ep: rejoin of DP%d failed", rank)
                self._set(record, "failed", error=f"{type(e).__name__}: {e}")
                proc = record.pop("_proc", None)
                if proc is not None and proc.is_alive():
                    _kill_with_stacks(proc)

    def _set(self, record: dict, state: str, **extra) -> None:
        with self._lock:
            record["state"] = state
            record[f"{state}_monotonic"] = time.monotonic()
            record.update(extra)
        log.info("resilient-ep: rejoin of DP%d: %s", record["rank"], state)

    # ------------------------------------------------------------------ the steps
    def _rejoin(self, rank: int, record: dict) -> None:
        h = self.host
        if rank not in h.dead():
            raise RejoinError(f"rank {rank} is live again")
        export = self._export(rank, record)
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self._start(rank, record, export)
                    self._verify(rank, record, export)
                    break
                except StartTimeout as e:
                    self._stop_replacement(rank, record.pop("_proc", None))
                    if attempt == START_ATTEMPTS:
                        raise
                    log.warning("resilient-ep: DP%d replacement: %s; stopped, starting "
                                "another (attempt %d of %d)", rank, e, attempt + 1,
                                START_ATTEMPTS)
                    with self._lock:
                        record["attempts"] = attempt + 1
                        record.setdefault("retried", []).append(str(e))
        finally:
            if export is not None:
                HostBackup(export).remove()
        join = h.monitor.admit(rank)
        with self._lock:
            record["epoch"] = join.epoch
            record["admitted_monotonic"] = time.monotonic()
        self._wait_switched(rank, join.epoch)
        record.pop("_proc", None)
        self._set(record, "live")
        h.rejoined(rank, join.epoch)

    def _export(self, rank: int, record: dict) -> str | None:
        """The survivors write what the replacement of ``rank`` will hold into a fresh
        directory of the node's shared memory; its path (None: no peer source). A survivor
        that fails to answer is skipped (the replacement then finds some expert missing and
        reads the model files, or the host backup has it)."""
        from resilient_ep.repair.host_backup import default_root

        from .instance import instance_of

        h = self.host
        settings = instance_of(h.vllm_config)
        if settings is None:
            return None
        rcfg, instance = settings
        sources = rcfg.repair.sources
        if "peer" not in sources or (rcfg.repair.host_backup and "host" in sources
                                     and sources.index("host") < sources.index("peer")):
            return None
        root = default_root(f"{instance}-rejoin-dp{rank}-{os.getpid()}-{len(self.rejoins)}")
        HostBackup(root).remove()
        self._set(record, "exporting")
        t0 = time.monotonic()
        done, nbytes, failed = set(), 0, []
        progress = {"experts": [], "bytes": 0, "failed": [], "asking": None, "seconds": 0.0}
        with self._lock:
            record["export"] = progress
        for i in range(h.num_ranks):
            if i in h.dead():
                continue
            with self._lock:
                progress["asking"] = i
            try:
                got = self._rpc_live(i, "resilient_ep_export_experts", (rank, str(root)))
            except Exception as e:  # lost meanwhile, or slow: the others may cover it
                log.warning("resilient-ep: DP%d did not export experts for DP%d's "
                            "replacement: %r", i, rank, e)
                failed.append(i)
                continue
            for w in got:
                done |= set(w.get("experts") or [])
                nbytes += int(w.get("bytes") or 0)
        with self._lock:
            progress.update(experts=sorted(done), bytes=nbytes, failed=failed, asking=None,
                            seconds=time.monotonic() - t0)
        return str(root)

    def _rpc_live(self, engine: int, method: str, args: tuple, timeout_s: float = RPC_TIMEOUT_S):
        """``collective_rpc`` on one engine, given up on as soon as the engine is lost (its
        answer would never come) or after ``timeout_s``."""
        return self.host.call(engine, "collective_rpc", (method, timeout_s, args, None),
                              timeout_s)

    def _rpc_joining(self, engine: int, method: str, args: tuple = (),
                     timeout_s: float = RPC_TIMEOUT_S):
        """``collective_rpc`` on the replacement (not live yet: no loss to watch for). One
        that is READY but does not answer is hung: :class:`StartTimeout` (another start)."""
        try:
            return self.host.call(engine, "collective_rpc", (method, timeout_s, args, None),
                                  timeout_s, watch_loss=False)
        except TimeoutError as e:
            raise StartTimeout(f"READY, but no answer to {method} within {timeout_s:.0f} s "
                               f"({e})") from e

    def _start(self, rank: int, record: dict, export: str | None) -> None:
        """The replacement process, up to READY."""
        import zmq
        from vllm.utils.network_utils import get_open_zmq_ipc_path

        address = get_open_zmq_ipc_path()
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        try:
            proc = self._spawn(rank, address, export)
            record["_proc"] = proc
            self._set(record, "joining", pid=proc.pid)
            self._handshake(sock, proc, rank, record)
        finally:
            sock.close(linger=0)

    def _start_timeout_s(self) -> float:
        from resilient_ep.config import RecoveryConfig

        from .instance import instance_of

        settings = instance_of(self.host.vllm_config)
        recovery = settings[0].recovery if settings else RecoveryConfig()
        return recovery.rejoin_start_timeout_s

    def _stop_replacement(self, rank: int, proc, timeout_s: float = 30.0) -> None:
        """Kill a replacement that hung in its start and wait until the liveness monitor has
        seen it go (the rank is lost again, not joining: another may begin)."""
        from resilient_ep.membership import RankState

        if proc is not None and proc.is_alive():
            _kill_with_stacks(proc)
            proc.join(timeout_s)
        membership = getattr(self.host.monitor, "membership", None)
        deadline = time.monotonic() + timeout_s
        while membership is not None and membership.state(rank) is RankState.JOINING:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the liveness monitor still has DP{rank} joining "
                                   f"{timeout_s} s after its replacement was stopped")
            time.sleep(0.05)

    def _spawn(self, rank: int, handshake_address: str, export: str | None = None):
        import multiprocessing

        from .replacement import EXPERTS_ENV, REJOIN_ENV, SINCE_ENV

        h = self.host
        manager = h.manager
        start = dict(manager._resilient_start)
        cfg = manager._resilient_vllm_config
        kwargs = {"vllm_config": cfg, "local_client": start.get("local_client", True),
                  "handshake_address": handshake_address,
                  "executor_class": start["executor_class"], "log_stats": start["log_stats"],
                  "tensor_queue": start.get("tensor_queue"), "dp_rank": rank,
                  "local_dp_rank": rank}
        # A fresh interpreter, never a fork: this process runs threads (the event loop, the
        # liveness monitor, ZeroMQ's), and a fork child inherits whatever lock one of them
        # held at that instant (a buffered stderr in the middle of a log line, for one) and
        # can hang on it in its start. vLLM forks its first engine cores before any of that.
        proc = multiprocessing.get_context("spawn").Process(
            target=run_replacement_engine_core, name=f"EngineCore_DP{rank}", kwargs=kwargs)
        # Its workers are fresh interpreters too: a fork of the replacement's engine core
        # hung now and then in its start (right after vLLM made it, before its memory
        # binding, twice in a row in one CI run), while the first engine cores' forks never did.
        membership = getattr(h.monitor, "membership", None)
        # Its own join comes after this epoch (``replacement.takes_part``).
        since = str(membership.epoch) if membership is not None else None
        env = {REJOIN_ENV: str(rank), EXPERTS_ENV: export, SINCE_ENV: since,
               "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
        with self._spawn_lock:  # the environment a spawned child starts with
            old = {k: os.environ.get(k) for k in env}
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            try:
                proc.start()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        h.monitor.begin_join(rank, proc)
        if h.rank_procs is not None:
            h.rank_procs.by_rank[rank] = proc
        # vLLM's manager stops what it holds at shutdown: the replacement, not the lost one
        for i, old in enumerate(manager.processes):
            if old.name == proc.name:
                manager.processes[i] = proc
        return proc

    def _handshake(self, sock, proc, rank: int, record: dict) -> None:
        """vLLM's start-up handshake, for one engine: HELLO -> the addresses -> READY."""
        import msgspec
        import zmq
        from vllm.v1.engine.utils import EngineHandshakeMetadata

        h = self.host
        manager = h.manager
        pc = manager._resilient_vllm_config.parallel_config
        identity = rank.to_bytes(2, "little")
        timeout_s = self._start_timeout_s()
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        ready = False
        while not ready:
            if time.monotonic() > deadline:
                raise StartTimeout(f"not READY within {timeout_s:.0f} s of its start")
            if proc.exitcode is not None or rank not in h.dead():
                raise RuntimeError(f"DP{rank} replacement exited (code {proc.exitcode}) "
                                   "while it started")
            if not poller.poll(500):
                continue
            who, raw = sock.recv_multipart()
            if who != identity:
                log.warning("resilient-ep: handshake message from %r ignored", who)
                continue
            msg = msgspec.msgpack.decode(raw)
            if msg.get("status") == "HELLO":
                config = {}
                if manager._resilient_coordinated_dp:
                    config = {k: getattr(pc, k) for k in (
                        "data_parallel_master_ip", "data_parallel_master_port",
                        "_data_parallel_master_port_list", "data_parallel_size")}
                    config["_coord_store_port"] = 0  # a replacement forms its world alone
                sock.send_multipart((identity, msgspec.msgpack.encode(EngineHandshakeMetadata(
                    addresses=manager._resilient_addresses, parallel_config=config))))
                self._set(record, "warming")
            elif msg.get("status") == "READY":
                ready = True
        self._set(record, "verifying")

    def _verify(self, rank: int, record: dict, export: str | None = None) -> None:
        """The replacement's weights and its probe forward against a survivor's: its dense
        weights' digest equal, its expert slots equal to the host backup or the model files
        (bitwise), and every module's output on the probe input (``probe.py``) equal to what
        the survivor's modules give, within rounding."""
        from resilient_ep.probe import compare

        h = self.host
        new = self._rpc_joining(rank, "resilient_ep_verify")
        probes = self._rpc_joining(rank, "resilient_ep_probe")
        ref = ref_probes = survivor = None
        for i in range(h.num_ranks):
            if i in h.dead():
                continue
            try:  # a survivor lost while it answers: the next one
                ref = self._rpc_live(i, "resilient_ep_verify", (False,))
                wanted = sorted({tuple(pair) for p in probes
                                 for pair in (p.get("experts") or {}).get("pairs") or []})
                ref_probes = self._rpc_live(i, "resilient_ep_probe",
                                            ([list(w) for w in wanted], export))
                survivor = i
                break
            except Exception as e:
                log.warning("resilient-ep: DP%d could not give its digest or probe: %r", i, e)
        if ref is None:
            raise RuntimeError("no live rank to compare with")
        for mine, theirs in zip(new, ref):
            if mine["dense_digest"] != theirs["dense_digest"]:
                raise RuntimeError(f"DP{rank} replacement's dense weights differ from DP"
                                   f"{survivor}'s ({mine['dense_digest']} != "
                                   f"{theirs['dense_digest']})")
            bad = (mine.get("experts") or {}).get("mismatched") or []
            if bad:
                raise RuntimeError(f"DP{rank} replacement's expert slots differ from the "
                                   f"host backup / model files: {bad[:8]}")
        probe_summary = {"dense_modules": 0, "experts_compared": 0, "experts_not_compared": 0,
                         "survivor_sources": {}}
        for mine, theirs in zip(probes, ref_probes):
            names = sorted(set(mine["dense"]) | set(theirs["dense"]))
            bad = compare(mine["dense"], theirs["dense"], names=names)
            mx, tx = mine.get("experts") or {}, theirs.get("experts") or {}
            if mx.get("skipped") or tx.get("skipped"):
                probe_summary["experts_skipped"] = mx.get("skipped") or tx.get("skipped")
            else:
                got = sorted(tx.get("experts") or {})
                bad += compare(mx.get("experts") or {}, tx.get("experts") or {}, names=got)
                probe_summary["experts_compared"] += len(got)
                probe_summary["experts_not_compared"] += len(mx.get("experts") or {}) - len(got)
                for k, v in (tx.get("sources") or {}).items():
                    probe_summary["survivor_sources"][k] = \
                        probe_summary["survivor_sources"].get(k, 0) + int(v)
            if bad:
                raise RuntimeError(f"DP{rank} replacement's probe forward differs from DP"
                                   f"{survivor}'s: {bad[:8]}")
            probe_summary["dense_modules"] += len(names)
        with self._lock:
            record["verified"] = {"dense_digest": new[0]["dense_digest"],
                                  "compared_with": survivor,
                                  "experts_checked": sum((w.get("experts") or {}).get(
                                      "checked", 0) for w in new),
                                  "loaded": [(w.get("experts") or {}).get("loaded")
                                             for w in new],
                                  "sources": [(w.get("experts") or {}).get("sources")
                                              for w in new],
                                  "probe": probe_summary}

    def _wait_switched(self, rank: int, epoch: int) -> None:
        """Until the replacement's workers run on the join's group (the survivors switched at
        the same step: the replacement's switch completes only with theirs)."""
        h = self.host
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while True:
            if rank in h.dead():
                raise RuntimeError(f"DP{rank} was lost again while it joined")
            try:
                got = h.call(rank, "resilient_ep_counters", (), 10.0)
                if all(int(w.get("incarnation", -1)) >= epoch for w in got.get("workers", [])):
                    return
            except Exception as e:  # busy in the switch: ask again
                log.debug("resilient-ep: DP%d not switched yet: %r", rank, e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"DP{rank} did not switch to epoch {epoch} within "
                                   f"{SWITCH_TIMEOUT_S} s")
            time.sleep(0.05)


def _kill_with_stacks(proc) -> None:
    """Kill a replacement that hung or failed (its engine core and its workers), after
    having each of them write its threads' stacks into the log (faulthandler on SIGUSR1,
    set up by ``plugin.register`` in a replacement's processes): what it was stuck in."""
    import psutil

    from .fencing import kernel_state

    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        procs = []
    for p in procs:  # what the kernel says of each (one in a syscall cannot dump its stacks)
        log.warning("resilient-ep: replacement process %s", kernel_state(p))
    for p in procs:
        try:
            p.send_signal(signal.SIGUSR1)
            time.sleep(0.3)  # one at a time: their dumps do not interleave in the log
        except psutil.Error:
            pass
    for p in procs[1:]:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.kill()


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A rejoin record as the status shows it (no private fields such as the process)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def respawn(rejoiner: Any, vllm_config: Any, rank: int) -> None:
    """``recovery.respawn``: a replacement for the lost ``rank``, at once (nothing when the
    setting is off; a rejoin that cannot start is logged, the instance serves on)."""
    from .instance import instance_of

    settings = instance_of(vllm_config)
    if settings is None or not settings[0].recovery.respawn:
        return
    try:
        rejoiner.request(rank, reason="respawn")
    except RejoinError as e:
        log.warning("resilient-ep: no respawn of DP%d: %s", rank, e)
