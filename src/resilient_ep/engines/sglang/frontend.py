"""The front end of a failover-enabled SGLang instance (the launcher process: HTTP server and
``TokenizerManager``, parent of the scheduler processes): the one membership authority, and
the request side of a failover.

- **Authority.** The core's :class:`~resilient_ep.liveness.LivenessMonitor` watches every
  scheduler process (its sentinel), hears their beacons and the loss reports of their
  failover groups, fences a lost rank (SIGKILL of the scheduler and anything it started: a
  rank that wakes up later can serve nothing twice), bumps the epoch and publishes every
  change on ``ipc://<instance dir>/membership``; each scheduler and the DP controller keep a
  replica of it. SGLang's own watchdog no longer watches the schedulers (it would take the
  instance down at the first death; ``patches/launch_failover.py``).
- **Routing.** Every generate request gets its DP rank here (``routed_dp_rank``, which
  SGLang's DP controller honours): the live rank with the fewest requests in flight (ties:
  the lowest rank). No new request goes to a dead rank.
- **Re-admission.** When a rank is lost, each request that was running on it goes to the
  rank the core's policy picks (:func:`resilient_ep.recovery.assign_requests`: least work,
  suspects kept apart; a request at ``recovery.max_request_failures`` deaths is failed with
  an error instead), as a new incarnation (``<rid>@<n>``) whose prompt is the original
  prompt plus every token the client has received, with the remaining ``max_new_tokens``.
  Its outputs are delivered under the original request id, so the client's stream just
  continues; anything still arriving from the lost rank is dropped (no token twice).
  Greedy output equals a run without the failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from array import array
from typing import Any

import psutil

from resilient_ep.liveness import LivenessMonitor, RankLoss
from resilient_ep.membership import Membership
from resilient_ep.recovery import assign_requests

from .instance import INCARNATION_SEP, beacon_endpoint, current, membership_endpoint

__all__ = ["Frontend", "current_frontend", "start"]

log = logging.getLogger(__name__)


class Frontend:
    def __init__(self, procs: dict[int, Any], *, start_monitor: bool = True):
        cfg, instance = current()
        self.cfg, self.instance = cfg, instance
        self.size = len(procs)
        self.procs = dict(procs)
        self.pids = {r: int(p.pid) for r, p in procs.items()}
        self.membership = Membership(self.size)
        self._children: dict[int, list[psutil.Process]] = {}
        self.monitor = LivenessMonitor(
            self.membership, self.procs, detector=cfg.detector,
            beacon_endpoint=beacon_endpoint(instance),
            publish_endpoint=membership_endpoint(instance), fence=self._fence,
            tick=self._census, name="sglang-liveness")
        self.monitor.add_listener(self._lost)
        self.tm = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.owner: dict[str, int] = {}           # request id -> rank serving it now
        self.requests: dict[str, Any] = {}        # request id -> its tokenized request (copy)
        self.incarnation: dict[str, str] = {}     # request id -> rid in flight now
        self.base_of: dict[str, str] = {}         # incarnation rid -> request id
        self.prefix: dict[str, int] = {}          # request id -> tokens before the incarnation
        self.deaths: dict[str, int] = {}          # request id -> rank deaths it was in flight at
        self.failovers: list[dict[str, Any]] = []
        self.poisoned: list[dict[str, Any]] = []
        self.dropped_outputs = 0
        self._lock = threading.Lock()
        import atexit
        import shutil

        from ..common.instance import instance_dir

        atexit.register(shutil.rmtree, instance_dir(instance), ignore_errors=True)
        if start_monitor:
            self.monitor.start()
        log.warning("resilient-ep: SGLang failover on: %d ranks watched (pids %s), instance %s",
                    self.size, self.pids, instance)

    # ------------------------------------------------------------------ authority
    def _census(self) -> None:
        for rank, proc in self.procs.items():
            if proc.exitcode is None:
                try:
                    kids = psutil.Process(proc.pid).children(recursive=True)
                except psutil.Error:
                    continue
                self._children[rank] = kids

    def _fence(self, rank: int, why: str) -> None:
        proc = self.procs[rank]
        log.warning("resilient-ep: scheduler rank %d (pid %d) %s: fencing it", rank, proc.pid, why)
        victims = list(self._children.get(rank, []))
        try:
            victims += psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def dead_ranks(self) -> set[int]:
        view = self.membership.view()
        return {r for r in range(view.num_ranks) if not view.is_live(r)}

    def live_ranks(self) -> list[int]:
        return list(self.membership.view().live_ranks)

    def _lost(self, loss: RankLoss) -> None:
        """Monitor thread: hand the loss to the tokenizer manager's loop."""
        t = time.monotonic()
        for p in self._children.get(loss.rank, []):
            try:
                p.kill()
            except psutil.Error:
                pass
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._failover, loss, t)
        else:
            self._failover(loss, t)

    # ------------------------------------------------------------------ routing
    def in_flight(self) -> dict[int, int]:
        counts = {r: 0 for r in range(self.size)}
        for r in self.owner.values():
            counts[r] += 1
        return counts

    def route(self, tm: Any, obj: Any) -> None:
        """Pick the DP rank of a new generate request and remember it (tokenizer loop)."""
        if self.tm is None:
            self.tm = tm
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        rid = obj.rid
        if rid in self.base_of:  # an incarnation we made: routed already
            return
        live = self.live_ranks()
        if not live:
            return
        target = obj.routed_dp_rank
        if target is None or target not in live:
            load = self.in_flight()
            target = min(live, key=lambda r: (load[r], r))
            obj.routed_dp_rank = target
        import msgspec

        with self._lock:
            self.owner[rid] = target
            self.requests[rid] = msgspec.structs.replace(obj)
            self.incarnation[rid] = rid

    # ------------------------------------------------------------------ outputs
    def remap_outputs(self, recv_obj: Any) -> None:
        """Outputs of an incarnation go to its request id; stale ones (from a lost rank, or an
        older incarnation) are dropped (renamed to an id nobody waits on)."""
        rids = recv_obj.rids
        for i, rid in enumerate(rids):
            base = self.base_of.get(rid, rid)
            now = self.incarnation.get(base)
            if now is None:
                continue  # not ours (embedding, health check) or finished
            if now != rid:
                rids[i] = f"{rid}{INCARNATION_SEP}stale"
                self.dropped_outputs += 1
                continue
            if rid != base:
                rids[i] = base
                done = self.prefix.get(base, 0)
                if getattr(recv_obj, "completion_tokens", None) is not None:
                    recv_obj.completion_tokens[i] += done
                if getattr(recv_obj, "prompt_tokens", None) is not None:
                    recv_obj.prompt_tokens[i] = len(self.requests[base].input_ids)

    def finished(self, recv_obj: Any) -> None:
        reasons = getattr(recv_obj, "finished_reasons", None) or []
        for rid, reason in zip(recv_obj.rids, reasons):
            if reason is not None:
                self.forget(rid)

    def forget(self, rid: str) -> None:
        base = self.base_of.get(rid, rid)
        with self._lock:
            inc = self.incarnation.pop(base, None)
            self.base_of.pop(inc, None) if inc and inc != base else None
            self.owner.pop(base, None)
            self.requests.pop(base, None)
            self.prefix.pop(base, None)
            self.deaths.pop(base, None)

    def incarnation_of(self, rid: str) -> str | None:
        inc = self.incarnation.get(rid)
        return inc if inc and inc != rid else None

    # ------------------------------------------------------------------ failover
    def _failover(self, loss: RankLoss, detected: float) -> None:
        rank = loss.rank
        live = self.live_ranks()
        tm = self.tm
        victims = [rid for rid, r in self.owner.items() if r == rank]
        log.warning("resilient-ep: scheduler rank %d lost (%s, exit code %s); live ranks %s, "
                    "epoch %d; %d request(s) to move", rank, loss.cause, loss.exitcode, live,
                    loss.epoch, len(victims))
        plan = assign_requests(dict(self.owner), [rank], live, deaths=self.deaths,
                               max_request_failures=self.cfg.recovery.max_request_failures)
        if plan.exhausted:
            self._fail(plan.exhausted, rank)
        moved = moved_tokens = 0
        for rid, target in plan.migrations.items():
            new = self._readmission(rid, target)
            if new is None or tm is None:
                continue
            task = asyncio.ensure_future(tm._send_one_request(new))
            task.add_done_callback(_log_failure)
            moved += 1
            moved_tokens += len(new.input_ids)
        for rid in plan.abandoned:
            self._fail([rid], rank, reason="no live rank is left to take it")
        self.failovers.append({
            "rank": rank, "dp_rank": rank, "cause": loss.cause, "exitcode": loss.exitcode,
            "epoch": loss.epoch, "detected_monotonic": loss.detected_monotonic,
            "handled_monotonic": time.monotonic(), "readmitted": moved,
            "readmitted_tokens": moved_tokens, "first_output_monotonic": None})
        log.warning("resilient-ep: re-admitted %d request(s) of rank %d on %s", moved, rank, live)
        if not live:
            # Nothing left to serve on: stop the instance the way SGLang stops it when a
            # child fails (its SIGQUIT handler tears every process down).
            log.error("resilient-ep: every scheduler rank is lost; stopping the instance")
            os.kill(os.getpid(), signal.SIGQUIT)

    def _readmission(self, rid: str, target: int) -> Any | None:
        import copy

        import msgspec

        orig = self.requests.get(rid)
        state = self.tm.rid_to_state.get(rid) if self.tm is not None else None
        if orig is None or state is None:
            self.forget(rid)
            return None
        generated = list(state.output_ids)
        n = self.deaths.get(rid, 0) + 1
        sp = copy.copy(orig.sampling_params)
        if getattr(sp, "max_new_tokens", None) is not None:
            sp.max_new_tokens = max(1, sp.max_new_tokens - len(generated))
        if getattr(sp, "min_new_tokens", 0):
            sp.min_new_tokens = max(0, sp.min_new_tokens - len(generated))
        inc = f"{rid}{INCARNATION_SEP}{n}"
        new = msgspec.structs.replace(
            orig, rid=inc, input_ids=array("q", list(orig.input_ids) + generated),
            sampling_params=sp, routed_dp_rank=target, time_stats=state.time_stats)
        with self._lock:
            old = self.incarnation.get(rid)
            if old and old != rid:
                self.base_of.pop(old, None)
            self.deaths[rid] = n
            self.owner[rid] = target
            self.incarnation[rid] = inc
            self.base_of[inc] = rid
            self.prefix[rid] = len(generated)
        return new

    def _fail(self, rids: list[str], rank: int, reason: str | None = None) -> None:
        """End these requests with an error finish (``recovery.max_request_failures``)."""
        from sglang.srt.managers.io_struct import AbortReq

        for rid in rids:
            deaths = self.deaths.get(rid, 0) + 1
            msg = reason or (f"resilient-ep: request was in flight at {deaths} rank deaths "
                             f"(recovery.max_request_failures="
                             f"{self.cfg.recovery.max_request_failures}); not moved again")
            self.poisoned.append({"request_id": rid, "deaths": deaths, "last_rank": rank,
                                  "reason": msg})
            self.forget(rid)
            if self.tm is not None:
                self.tm._handle_abort_req(AbortReq(
                    rid=rid, finished_reason={"type": "abort", "message": msg}))
        log.error("resilient-ep: %d request(s) failed, not moved again: %s", len(rids), rids)

    def first_output(self) -> None:
        """A survivor delivered output: the stall of every pending loss ends now."""
        now = time.monotonic()
        for e in self.failovers:
            if e["first_output_monotonic"] is None:
                e["first_output_monotonic"] = now


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("resilient-ep: re-admitting a request failed: %r", task.exception())


_frontend: Frontend | None = None


def current_frontend() -> Frontend | None:
    return _frontend


def start(procs: dict[int, Any]) -> Frontend:
    global _frontend
    if _frontend is None:
        _frontend = Frontend(procs)
    return _frontend
