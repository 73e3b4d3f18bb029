"""The SimPy model of one EP instance serving a request stream under one policy.

Processes (SimPy, one environment per policy run):

- ``Instance.run``: advances the instance in slices of ``sim.time_slice_s``; every state change
  (a failure, a pause, a rank back) first brings it up to the current time with ``sync()``,
  so a slice never straddles a change.
- ``Simulation._inject``: replays the failure events.
- the policy's recovery processes (detection, repair, restart, rejoin), see ``policies/``.

Rank-level state is numpy arrays over ranks, the requests a fluid: per rank the number of
running sequences and the sum of their context lengths; output lengths are geometric, so a
fraction ``1 - exp(-steps / output_tokens)`` of a rank's sequences finishes over ``steps``
decode steps. Queued requests are cohorts ``(arrival time, count, prefill tokens each,
context each, resumed?)``: resumed cohorts (restored or re-prefilled requests) go first and
may exceed ``max_batch_per_rank``; a new cohort older than ``request_timeout_s`` is lost.

While any blocker is set (a failure not yet recovered, a reintegration pause) no rank steps:
in wide EP every decode step needs every member.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np
import simpy

from resilient_ep.sim.failures import FailureEvent, build_events
from resilient_ep.sim.scenario import Scenario
from resilient_ep.sim.timing import nominal_capacity, step_time_s

__all__ = ["SERVING", "DOWN", "Cohort", "FailureRecord", "Arrivals", "Instance", "Simulation",
           "Stranded"]

SERVING, DOWN = 0, 1
"""Rank states: serving in the instance, or out of it (failed, restarting, rejoining)."""


@dataclass
class Cohort:
    """Requests that arrived (or were put back) together and wait for a rank."""

    t: float
    count: float
    prefill_tokens: float
    """Tokens each must (re)compute before decoding."""
    ctx: float
    """Context length each brings (prompt plus tokens already generated)."""
    resumed: bool = False


@dataclass
class Stranded:
    """Requests that were running on ranks that left the instance."""

    count: float = 0.0
    ctx_tokens: float = 0.0

    def add(self, other: "Stranded") -> None:
        self.count += other.count
        self.ctx_tokens += other.ctx_tokens


@dataclass
class FailureRecord:
    """What happened to one failure; ``stall_s`` comes from it."""

    time_s: float
    rank: int
    kind: str
    key: Hashable | None = None
    unblocked: bool = False
    resumed_at: float | None = None
    """First time after its blocker was lifted that no blocker was left."""
    first_token_at: float | None = None
    """First output tokens after ``resumed_at``: the end of the first decode step (a step's
    tokens come out when it completes). The surviving ranks' in-flight step goes first, as a
    rerouted step does; requests admitted at the resume (restored, re-prefilled, new) join
    the steps after it. With nothing left running (a full restart) it is the first step after
    their prefill."""
    restore_until: float | None = None
    """When the restored requests of this failure were back (restore policies)."""

    def stall_s(self, end: float) -> float:
        done = self.first_token_at if self.first_token_at is not None else end
        if self.restore_until is not None:
            done = max(done, self.restore_until)
        return max(0.0, min(done, end) - self.time_s)


class Arrivals:
    """Poisson arrivals drawn once per scenario on a fine grid, so that every policy sees
    the same requests; counts between two times are interpolated (fluid)."""

    GRID_S = 0.05

    def __init__(self, rate_per_s: float, duration_s: float, rng: np.random.Generator):
        n = int(math.ceil(duration_s / self.GRID_S)) + 1
        counts = rng.poisson(rate_per_s * self.GRID_S, size=n).astype(np.float64)
        self._cum = np.concatenate([[0.0], np.cumsum(counts)])

    def cumulative(self, t: float) -> float:
        x = t / self.GRID_S
        i = int(x)
        if i >= len(self._cum) - 1:
            return float(self._cum[-1])
        return float(self._cum[i] + (x - i) * (self._cum[i + 1] - self._cum[i]))

    def between(self, t0: float, t1: float) -> float:
        return self.cumulative(t1) - self.cumulative(t0)


class Instance:
    """The EP instance: rank arrays, request fluid, queue, blockers, counters."""

    def __init__(self, env: simpy.Environment, sc: Scenario, arrivals: Arrivals):
        self.env = env
        self.sc = sc
        self.arrivals = arrivals
        R = sc.ranks
        self.state = np.full(R, SERVING, dtype=np.int8)
        self.alive = np.ones(R, dtype=bool)
        self.running = np.zeros(R)
        self.ctx = np.zeros(R)
        self.rank_load = np.ones(R)
        """Relative expert load each rank carries (baselines; 0 on ranks out)."""
        self.imbalance_override: float | None = None
        """When set (``resilient_ep``), the max/mean rank load to use instead of ``rank_load``."""
        self.queue: deque[Cohort] = deque()
        self.blockers: set[Hashable] = set()
        self.frontend_up = True
        self.prefill_debt_s = 0.0
        self.last_t = 0.0
        self.records: list[FailureRecord] = []
        self._awaiting_token: list[FailureRecord] = []
        nbins = int(math.ceil(sc.duration_s / sc.sim.goodput_bin_s))
        self.bins = np.zeros(nbins)
        # Counters.
        self.requests_arrived = 0.0
        """Arrivals plus the requests the run starts with (steady state)."""
        self.requests_lost = 0.0
        self.recomputed_tokens = 0.0
        self.completed = 0.0
        self.unavailable_s = 0.0
        self.reintegration_pause_s = 0.0
        self.extras: dict[str, Any] = {}
        """Policy-specific facts for the report (weight copies, placement cost...)."""

    # ------------------------------------------------------------------ state changes
    @property
    def n_live(self) -> int:
        return int(self.alive.sum())

    def imbalance(self) -> float:
        if self.imbalance_override is not None:
            return self.imbalance_override
        loads = self.rank_load[self.alive]
        if loads.size == 0:
            return 1.0
        return self.sc.timing.load_imbalance * float(loads.max() / loads.mean())

    def block(self, key: Hashable) -> None:
        self.sync()
        self.blockers.add(key)

    def unblock(self, key: Hashable) -> None:
        self.sync()
        self.blockers.discard(key)
        for rec in self.records:
            if rec.key == key:
                rec.unblocked = True
        if not self.blockers:
            step = self._survivors_step_s()
            for rec in self.records:
                if rec.unblocked and rec.resumed_at is None:
                    rec.resumed_at = self.env.now
                    if step is not None:
                        rec.first_token_at = self.env.now + step
                    else:
                        self._awaiting_token.append(rec)

    def _survivors_step_s(self) -> float | None:
        """The step that the requests still running on live ranks complete first when the
        instance resumes (their in-flight step, rerouted), before anything queued meanwhile
        is admitted and prefilled; None if nothing is running (a full restart: the first
        step then comes after the re-prefill). The fluid in ``_advance`` pays a slice's
        prefill first; the order inside a slice does not change its tokens."""
        n_live = self.n_live
        live_running = self.running[self.alive]
        total = float(live_running.sum())
        if n_live == 0 or total <= 0:
            return None
        return step_time_s(self.sc, batch_max=float(live_running.max()), total_tokens=total,
                           live_ranks=n_live, imbalance=self.imbalance())

    def take_ranks(self, ranks: list[int] | np.ndarray) -> Stranded:
        """Remove ranks from the instance; return the requests that ran on them."""
        self.sync()
        idx = np.asarray(ranks, dtype=np.int64)
        out = Stranded(float(self.running[idx].sum()), float(self.ctx[idx].sum()))
        self.running[idx] = 0.0
        self.ctx[idx] = 0.0
        self.state[idx] = DOWN
        self.alive[idx] = False
        return out

    def add_ranks(self, ranks: list[int] | np.ndarray) -> None:
        """Ranks join the instance (empty; the queue fills them)."""
        self.sync()
        idx = np.asarray(ranks, dtype=np.int64)
        self.state[idx] = SERVING
        self.alive[idx] = True

    def requests_in_system(self) -> float:
        """Running plus queued requests (not those a policy holds while restoring them)."""
        return float(self.running.sum()) + sum(c.count for c in self.queue)

    def lose(self, stranded: Stranded) -> None:
        self.requests_lost += stranded.count

    def resume(self, stranded: Stranded, *, prefill_tokens_each: float) -> None:
        """Put stranded requests back at the head of the queue; each recomputes
        ``prefill_tokens_each`` tokens (counted as recomputed) before decoding again."""
        if stranded.count <= 0:
            return
        self.sync()
        ctx_each = stranded.ctx_tokens / stranded.count
        self.recomputed_tokens += prefill_tokens_each * stranded.count
        self.queue.appendleft(Cohort(self.env.now, stranded.count, prefill_tokens_each,
                                     ctx_each, resumed=True))

    # ------------------------------------------------------------------------ dynamics
    def run(self):
        dt = self.sc.sim.time_slice_s
        while True:
            yield self.env.timeout(dt)
            self.sync()

    def sync(self) -> None:
        now = self.env.now
        if now > self.last_t:
            self._advance(self.last_t, now)
            self.last_t = now

    def _advance(self, t0: float, t1: float) -> None:
        dt = t1 - t0
        w = self.sc.workload
        arrived = self.arrivals.between(t0, t1)
        self.requests_arrived += arrived
        if arrived > 0:
            if self.frontend_up:
                self.queue.append(Cohort(0.5 * (t0 + t1), arrived, w.prompt_tokens,
                                         w.prompt_tokens))
            else:
                self.requests_lost += arrived
        self._expire(t1)
        n_live = self.n_live
        if self.blockers or n_live == 0:
            self.unavailable_s += dt
            return
        self._admit(n_live)
        avail = dt
        pay = min(avail, self.prefill_debt_s)
        self.prefill_debt_s -= pay
        avail -= pay
        if avail <= 0:
            return
        live_running = self.running[self.alive]
        total = float(live_running.sum())
        if total <= 0:
            return
        step = step_time_s(self.sc, batch_max=float(live_running.max()), total_tokens=total,
                           live_ranks=n_live, imbalance=self.imbalance())
        steps = avail / step
        L = float(w.output_tokens)
        frac = -math.expm1(-steps / L)
        tokens_per_rank = self.running * (L * frac)
        tokens = float(tokens_per_rank.sum())
        self.completed += total * frac
        self.ctx = (self.ctx + tokens_per_rank) * (1.0 - frac)
        self.running *= 1.0 - frac
        self._record(t1 - avail, t1, tokens)
        if tokens > 0 and self._awaiting_token:
            for rec in self._awaiting_token:
                rec.first_token_at = t1 - avail + step
            self._awaiting_token = []

    def _expire(self, now: float) -> None:
        limit = now - self.sc.workload.request_timeout_s
        if not self.queue:
            return
        kept: deque[Cohort] = deque()
        changed = False
        for c in self.queue:
            if not c.resumed and c.t < limit:
                self.requests_lost += c.count
                changed = True
            else:
                kept.append(c)
        if changed:
            self.queue = kept

    def _admit(self, n_live: int) -> None:
        if not self.queue:
            return
        w = self.sc.workload
        free = np.where(self.alive, np.maximum(w.max_batch_per_rank - self.running, 0.0), 0.0)
        total_free = float(free.sum())
        new_n = new_ctx = res_n = res_ctx = prefill = 0.0
        while self.queue:
            c = self.queue[0]
            if c.resumed:
                res_n += c.count
                res_ctx += c.count * c.ctx
                prefill += c.count * c.prefill_tokens
                self.queue.popleft()
                continue
            room = total_free - new_n
            if room <= 1e-9:
                break
            take = min(c.count, room)
            new_n += take
            new_ctx += take * c.ctx
            prefill += take * c.prefill_tokens
            c.count -= take
            if c.count <= 1e-9:
                self.queue.popleft()
            else:
                break
        if new_n > 0:
            share = free / total_free
            self.running += new_n * share
            self.ctx += new_ctx * share
        if res_n > 0:
            share = self.alive / n_live
            self.running += res_n * share
            self.ctx += res_ctx * share
        self.prefill_debt_s += prefill * self.sc.timing.prefill_us_per_token * 1e-6 / n_live

    def _record(self, a: float, b: float, tokens: float) -> None:
        w = self.sc.sim.goodput_bin_s
        n = len(self.bins)
        i0, i1 = int(a // w), int(b // w)
        if i1 >= n:
            i1 = n - 1
        if i0 >= n:
            return
        if i0 == i1 or b <= a:
            self.bins[i0] += tokens
            return
        rate = tokens / (b - a)
        for i in range(i0, i1 + 1):
            lo, hi = max(a, i * w), min(b, (i + 1) * w)
            if hi > lo:
                self.bins[i] += rate * (hi - lo)


class Simulation:
    """One policy on one scenario: build the SimPy environment, run it, hand back state."""

    def __init__(self, sc: Scenario, policy_name: str, *, events: list[FailureEvent] | None = None,
                 arrivals: Arrivals | None = None):
        from resilient_ep.sim.policies import POLICIES  # late: policies import this module

        self.sc = sc
        self.env = simpy.Environment()
        self.capacity = nominal_capacity(sc)
        if events is None:
            events = build_events(sc, np.random.default_rng([sc.seed, 2]))
        if arrivals is None:
            arrivals = make_arrivals(sc)
        self.events = events
        self.inst = Instance(self.env, sc, arrivals)
        self.policy = POLICIES[policy_name](self)

    def detection_s(self, kind: str) -> float:
        d = self.sc.detection
        return d.heartbeat_timeout_s if kind == "hang" else d.crash_s

    def run(self) -> Instance:
        self.policy.setup()
        self._prefill_steady_state()
        self.env.process(self.inst.run())
        self.env.process(self._inject())
        self.env.run(until=self.sc.duration_s)
        self.inst.sync()
        self.policy.finish()
        return self.inst

    def _prefill_steady_state(self) -> None:
        """Start from the steady state instead of an empty instance, so that pre-fault
        goodput is flat from t=0: per-rank batch ``b`` solving Little's law
        ``b = rate / R * output_tokens * step(b) / (1 - rate / R * prefill time)``, capped at
        ``max_batch_per_rank``."""
        sc, w = self.sc, self.sc.workload
        rate = self.capacity.requests_per_s * w.load_factor / sc.ranks
        prefill_s = w.prompt_tokens * sc.timing.prefill_us_per_token * 1e-6
        b = float(w.max_batch_per_rank)
        for _ in range(50):
            step = step_time_s(sc, batch_max=b, total_tokens=b * sc.ranks, live_ranks=sc.ranks,
                               imbalance=self.inst.imbalance())
            decode_share = max(0.05, 1.0 - rate * prefill_s)  # prefill steals decode time
            b = min(float(w.max_batch_per_rank), rate * w.output_tokens * step / decode_share)
        self.inst.running[:] = b
        self.inst.requests_arrived += b * sc.ranks
        # Geometric output lengths: running requests have generated output_tokens on average.
        self.inst.ctx[:] = b * (w.prompt_tokens + w.output_tokens)

    def _inject(self):
        for i, ev in enumerate(self.events):
            if ev.time_s > self.env.now:
                yield self.env.timeout(ev.time_s - self.env.now)
            self._fail(i, ev)

    def _fail(self, i: int, ev: FailureEvent) -> None:
        inst = self.inst
        inst.sync()
        rec = FailureRecord(ev.time_s, ev.rank, ev.kind)
        inst.records.append(rec)
        if inst.state[ev.rank] != SERVING:
            # Already out of the instance (failed before, restarting, rejoining).
            rec.unblocked = True
            rec.resumed_at = rec.first_token_at = self.env.now
            self.policy.on_failure_while_out(ev)
            return
        rec.key = ("failure", i)
        inst.block(rec.key)
        stranded = inst.take_ranks([ev.rank])
        self.env.process(self.policy.recover(ev, rec, stranded))


def make_arrivals(sc: Scenario) -> Arrivals:
    rate = nominal_capacity(sc).requests_per_s * sc.workload.load_factor
    return Arrivals(rate, sc.duration_s, np.random.default_rng([sc.seed, 1]))
