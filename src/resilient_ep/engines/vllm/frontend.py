"""The API server's engine client, with failover: :class:`ResilientDPLBAsyncMPClient`.

vLLM's ``DPLBAsyncMPClient`` balances requests over the data-parallel engine cores and, when
any of them dies, marks the whole engine dead and shuts every core down
(``MPClient.start_engine_core_monitor``). This subclass instead:

- watches each engine-core process itself and, on a death, kills what is left of that rank
  (its workers, which vLLM would let linger for seconds while the survivors wait on them)
  and marks that DP rank dead (``resilient_epoch`` += 1); an engine core whose liveness beacons (``beacon.py``) stop for
  ``detector.heartbeat_timeout_ms`` is fenced (SIGKILLed with its workers) first;
- sends no new request to a dead rank (``get_core_engine_for_request``);
- re-admits the requests that were running on the dead rank on the least-loaded live one,
  under the same request id, with prompt = original prompt + tokens generated so far and the
  remaining ``max_tokens``: the client's stream simply continues (greedy output is the same
  as without the failure; seeded sampling continues with a fresh generator);
- drops anything still arriving from the dead rank, so no token is delivered twice.

Engines other than the dead one keep running: their workers fail the step they were in and
run it again without the dead rank (see ``all2all.py`` and ``engine_core.py``).
Installed by the ``vllm-dp-client-failover`` patch (``EngineCoreClient.make_async_mp_client``)
when resilience is on and there is one API server process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import weakref
from multiprocessing.connection import wait as wait_sentinels

import zmq
from vllm.v1.engine.core_client import DPLBAsyncMPClient

from resilient_ep.detector import FailureDetector

from .beacon import beacon_endpoint, parse_beacon
from .groups import instance_of

__all__ = ["ResilientDPLBAsyncMPClient", "readmission_request"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _fence(proc, known_children, why: str) -> None:
    """SIGKILL an engine core and its children (its workers; ``known_children`` from the last
    census too, in case one was re-parented): it must never wake up and serve the requests
    we are about to re-admit elsewhere."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        victims = []
    log.warning("resilient-ep: engine core %s (pid %d) %s: fencing it", proc.name, proc.pid,
                why)
    _kill([*known_children, *victims])


def _log_failed_readmission(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("resilient-ep: re-admitting a request failed: %r", task.exception())


def readmission_request(request, generated: list[int], restore: bool = False):
    """A copy of ``request`` that continues after ``generated`` tokens; with ``restore`` it
    asks the KV connector (``kv_connector.py``) to load the request's newest verified
    checkpoint, so only the tail after it is recomputed."""
    import copy

    new = copy.copy(request)
    new.prompt_token_ids = list(request.prompt_token_ids) + list(generated)
    sp = request.sampling_params.clone()
    if restore:  # vLLM carries a request's kv_transfer_params in its sampling extra_args
        extra = dict(sp.extra_args or {})
        params = dict(extra.get("kv_transfer_params") or {})
        params.setdefault("resilient_restore", params.get("resilient_id") or request.request_id)
        extra["kv_transfer_params"] = params
        sp.extra_args = extra
    if sp.max_tokens is not None:
        sp.max_tokens = max(1, sp.max_tokens - len(generated))
    if getattr(sp, "min_tokens", 0):
        sp.min_tokens = max(0, sp.min_tokens - len(generated))
    new.sampling_params = sp
    new.data_parallel_rank = None
    return new


class ResilientDPLBAsyncMPClient(DPLBAsyncMPClient):
    def __init__(self, *args, **kwargs):
        self.resilient_dead: set[int] = set()
        self.resilient_epoch = 0
        self.resilient_events: list[dict] = []
        self._re_requests: dict[str, object] = {}
        self._re_generated: dict[str, list[int]] = {}
        self._re_loop: asyncio.AbstractEventLoop | None = None
        super().__init__(*args, **kwargs)
        from .kv_setup import is_ours

        self._re_restore = is_ours(getattr(self.vllm_config, "kv_transfer_config", None))

    # ---------------------------------------------------------------- liveness
    def start_engine_core_monitor(self):
        manager = self.resources.engine_manager
        if manager is None:
            return
        procs = list(manager.processes)
        self_ref = weakref.ref(self)
        settings = instance_of(self.vllm_config)
        beacons = None
        if settings is not None:
            beacons = zmq.Context.instance().socket(zmq.PULL)
            beacons.setsockopt(zmq.LINGER, 0)
            beacons.bind(beacon_endpoint(settings[1]))
        detector = FailureDetector([], settings[0].detector if settings else None)

        def rank_of(proc) -> int:
            m = re.search(r"DP(\d+)", proc.name or "")
            return int(m.group(1)) if m else procs.index(proc)

        def watch() -> None:
            alive = {p.sentinel: p for p in procs}
            by_rank = {rank_of(p): p for p in procs}
            fenced: dict[int, str] = {}
            heard: set[int] = set()
            poller = zmq.Poller()
            for s in alive:
                poller.register(s, zmq.POLLIN)
            if beacons is not None:
                poller.register(beacons, zmq.POLLIN)
            interval_ms = detector.config.heartbeat_interval_ms
            kids: dict[int, list] = {}
            next_census = 0.0
            try:
                while alive:
                    ready = dict(poller.poll(interval_ms))
                    now = time.monotonic()
                    if now >= next_census:  # each engine core's workers, for the fence below
                        next_census = now + 1.0
                        for r, p in by_rank.items():
                            if p.sentinel in alive:
                                kids[r] = _children(p.pid) or kids.get(r, [])
                    if beacons is not None and beacons in ready:
                        while True:
                            try:
                                got = parse_beacon(beacons.recv(zmq.NOBLOCK))
                            except zmq.Again:
                                break
                            if got is None or got[1] not in by_rank:
                                continue  # malformed or not a rank of this instance
                            kind, rank, _ = got
                            if kind == "dead":
                                # A live group lost this rank (its worker died or froze):
                                # the rank is fenced whole, then failed over.
                                proc = by_rank[rank]
                                if proc.sentinel in alive and rank not in fenced:
                                    fenced[rank] = "reported"
                                    _fence(proc, kids.get(rank, []), "its peers lost it")
                                continue
                            if rank not in heard:  # watched from its first beacon on
                                heard.add(rank)
                                detector.reset(rank, now)
                            detector.heartbeat(rank, now)
                    for suspicion in detector.poll(now):
                        proc = by_rank.get(suspicion.rank)
                        if proc is not None and proc.sentinel in alive:
                            fenced[suspicion.rank] = "hang"
                            # its sentinel fires next: failover as for a crash
                            _fence(proc, kids.get(suspicion.rank, []), "stopped answering")
                    for sentinel in [s for s in alive if s in ready]:
                        proc = alive.pop(sentinel)
                        poller.unregister(sentinel)
                        rank = rank_of(proc)
                        # Its workers outlive it by seconds (vLLM's cleanup) while the
                        # survivors' collectives wait on them: the rank is the engine core and
                        # its workers, so they go now.
                        _kill(kids.get(rank, []))
                        proc.join(timeout=1)  # reap it: exit code known, no zombie left
                        detector.forget(rank)
                        me = self_ref()
                        if me is None or not me._finalizer.alive or me.resources.engine_dead:
                            return
                        me._engine_died(rank, proc.exitcode, fenced.get(rank, "exit"))
                        del me
            finally:
                if beacons is not None:
                    beacons.close(linger=0)

        threading.Thread(target=watch, daemon=True, name="ResilientEngineMonitor").start()

    def _engine_died(self, rank: int, exitcode, cause: str = "exit") -> None:
        t = time.monotonic()
        loop = self._re_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_engine_death, rank, exitcode, t, cause)
        else:
            self._on_engine_death(rank, exitcode, t, cause)

    def _on_engine_death(self, rank: int, exitcode, detected_at: float,
                         cause: str = "exit") -> None:
        if rank in self.resilient_dead:
            return
        self.resilient_dead.add(rank)
        self.resilient_epoch += 1
        live = [i for i in range(len(self.core_engines)) if i not in self.resilient_dead]
        log.warning("resilient-ep: engine core DP%d died (exit code %s); live DP ranks %s, "
                    "epoch %d", rank, exitcode, live, self.resilient_epoch)
        if not live:
            self.resources.engine_dead = True
            self.shutdown()
            return
        dead_engine = self.core_engines[rank]
        victims = [rid for rid, eng in self.reqs_in_flight.items() if eng == dead_engine]
        log.info("resilient-ep: in flight at the death of DP%d: %s", rank,
                 {self.core_engines.index(e): sum(1 for v in self.reqs_in_flight.values()
                                                  if v == e) for e in self.core_engines})
        readmitted = 0
        for rid in victims:
            self.reqs_in_flight.pop(rid, None)
            self.engine_inflight[dead_engine] -= 1
            request = self._re_requests.get(rid)
            if request is None:
                continue
            try:
                new = readmission_request(request, self._re_generated.get(rid, []),
                                          restore=self._re_restore)
            except Exception:  # one request that cannot be copied must not cost the others
                log.exception("resilient-ep: request %s could not be re-admitted", rid)
                continue
            task = asyncio.ensure_future(self.add_request_async(new))
            task.add_done_callback(_log_failed_readmission)
            readmitted += 1
        self.resilient_events.append({
            "dp_rank": rank, "exitcode": exitcode, "cause": cause,
            "detected_monotonic": detected_at,
            "handled_monotonic": time.monotonic(), "readmitted": readmitted,
            "epoch": self.resilient_epoch})
        log.warning("resilient-ep: re-admitted %d request(s) of DP%d on %s", readmitted, rank,
                    live)

    # ---------------------------------------------------------------- routing
    def get_core_engine_for_request(self, request):
        if request.data_parallel_rank is not None and \
                request.data_parallel_rank in self.resilient_dead:
            request.data_parallel_rank = None
        chosen = super().get_core_engine_for_request(request)
        if not self.resilient_dead or self.core_engines.index(chosen) not in self.resilient_dead:
            return chosen
        self.engine_inflight[chosen] -= 1
        live = [e for i, e in enumerate(self.core_engines) if i not in self.resilient_dead]
        target = min(live, key=lambda e: self.engine_inflight[e])
        self.reqs_in_flight[request.request_id] = target
        self.engine_inflight[target] += 1
        return target

    async def add_request_async(self, request) -> None:
        if self._re_loop is None:
            self._re_loop = asyncio.get_running_loop()
        if request.prompt_token_ids is not None and request.sampling_params is not None:
            self._re_requests[request.request_id] = request
            self._re_generated[request.request_id] = []
        await super().add_request_async(request)

    async def abort_requests_async(self, request_ids) -> None:
        for rid in request_ids:
            self._re_requests.pop(rid, None)
            self._re_generated.pop(rid, None)
        await super().abort_requests_async(request_ids)

    @staticmethod
    async def process_engine_outputs(self, outputs):
        if self.resilient_dead and outputs.engine_index in self.resilient_dead:
            # Sent by a rank before it died and read after we re-admitted its requests.
            outputs.outputs = []
            outputs.finished_requests = None
            outputs.scheduler_stats = None
            return
        for out in outputs.outputs:
            gen = self._re_generated.get(out.request_id)
            if gen is not None:
                gen.extend(out.new_token_ids)
                if out.finish_reason is not None:
                    self._re_generated.pop(out.request_id, None)
                    self._re_requests.pop(out.request_id, None)
        await DPLBAsyncMPClient.process_engine_outputs(self, outputs)
