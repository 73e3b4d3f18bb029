"""A replacement engine rank joining a running vLLM instance: the engine core's and the
workers' half (the front end's is ``rejoin.py``).

A replacement is an engine-core process the front end starts for a lost DP rank with
``RESILIENT_EP_REJOIN`` in its environment (its workers inherit it). It must come up next to
ranks that are serving, without them noticing:

- **A world of its own.** vLLM's torch.distributed world spans every DP rank and was formed
  once, at the start, on a store that is gone now. A replacement worker forms a world of the
  same geometry alone (:func:`init_private_world`: the ``fake`` backend for every group that
  reaches another DP rank; groups inside its own rank are real), so vLLM builds its DP, EP and
  TP groups with the usual ranks and sizes and places the experts as on any rank. Nothing of
  the DP data path uses those groups: it runs on the failover groups (``groups.py``).
- **Solo until the join.** Its failover groups have no peer, so its warm-up and compile
  forward passes touch no survivor; it ignores the coordinator's wave starts.
- **The flip, between two steps.** When the authority admits the rank (one epoch, published
  to every process), every engine core hears it (:class:`EngineJoin`). The survivors agree on
  it in their "anyone busy?" sum (every survivor contributes the newest join it knows; when
  all are equal, all switch after that very sum), switch their workers' and their own groups
  to the join's incarnation (a worker RPC between two steps) and say where they are (step
  count, wave, busy) in one exchange on the new group. The replacement, woken by the same
  news, switches its workers, waits for that exchange and adopts the survivors' step count
  and wave: from the next step on it runs in step with them. An idle survivor wakes for one
  pass to reach the sum.
- **No request before the flip.** The front ends route to the rank from its admission on; the
  replacement's own subscriber may hear of it a moment later. A request that reached it first
  would run on the solo groups with a fresh process's expert maps: without the survivors'
  experts, its prefill and its KV wrong (seen once in CI: every expert missing from one
  prefill). So a request that arrives before the flip flips it at once when the admission is
  already in this process's replica, else waits, held, until the flip (:meth:`EngineJoin.
  before_request`).

Survivors never restart, recompile or recapture anything: their only cost is the switch (a
worker RPC and two new sockets per group) at one step boundary.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from typing import Any

import torch

from resilient_ep.liveness import RankJoin

from .replacement import REJOIN_ENV, is_replacement

__all__ = ["REJOIN_ENV", "is_replacement", "init_private_world", "EngineJoin", "engine_join",
           "history_of"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


# ---------------------------------------------------------------------- worker: the world
def init_private_world(vllm_config: Any, world_size: int, rank: int) -> None:
    """Form this replacement worker's torch.distributed world alone, before vLLM's
    ``init_distributed_environment`` (which then finds it formed): the DP-wide ranks and size
    vLLM expects, the ``fake`` backend for every group that reaches beyond this DP rank (its
    collectives do nothing; none is on the data path), real gloo inside it."""
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers "fake")

    if dist.is_initialized():
        return
    pc = vllm_config.parallel_config
    if world_size != 1:
        raise NotImplementedError(
            f"resilient-ep: a replacement engine rank with {world_size} workers (TP x PP > 1) "
            "cannot rejoin yet; rejoin supports TP = PP = 1 per DP rank")
    dp_rank = int(pc.data_parallel_rank)
    first = dp_rank * world_size
    own = set(range(first, first + world_size))
    dist.init_process_group("fake", store=dist.HashStore(), rank=first + rank,
                            world_size=int(pc.world_size_across_dp))
    original = dist.new_group
    if getattr(original, "__resilient_ep_private_world__", False):
        return

    def new_group(ranks=None, *args, **kwargs):
        if ranks is None or not set(int(r) for r in ranks) <= own:
            kwargs["backend"] = "fake"
            args = ()  # (the second positional parameter is the timeout; dropped for fake)
        return original(ranks, *args, **kwargs)

    new_group.__resilient_ep_private_world__ = True  # type: ignore[attr-defined]
    dist.new_group = new_group
    _same_node_without_collectives()
    log.info("resilient-ep: replacement worker formed its world alone (global rank %d of %d)",
             first + rank, pc.world_size_across_dp)


def _same_node_without_collectives() -> None:
    """vLLM's ``in_the_same_node_as`` gathers objects over a group; over a ``fake`` group the
    gathered sizes are garbage (huge allocations, pickle errors, once a worker that died). A
    replacement's cross-rank groups are fake: answer "same node" for them without a
    collective (the instance is on one host; its groups are Unix sockets)."""
    import torch.distributed as dist

    try:
        import vllm.distributed.parallel_state as ps
    except ImportError:  # (unit tests of the world without vLLM)
        return
    original = ps.in_the_same_node_as
    if getattr(original, "__resilient_ep_private_world__", False):
        return

    def in_the_same_node_as(pg, source_rank=0):
        try:
            fake = dist.get_backend(pg) == "fake"
        except Exception:  # not a torch ProcessGroup (vLLM's stateless groups)
            fake = False
        if fake:
            return [True] * dist.get_world_size(group=pg)
        return original(pg, source_rank)

    in_the_same_node_as.__resilient_ep_private_world__ = True  # type: ignore[attr-defined]
    # vLLM's callers on this path (_node_count, the device communicators, the shared-memory
    # broadcaster) look it up in parallel_state when they run.
    ps.in_the_same_node_as = in_the_same_node_as


# ---------------------------------------------------------------------- engine core
def history_of(events, upto: int) -> list[dict]:
    """The membership log up to epoch ``upto`` as plain dicts (for a worker RPC)."""
    out = []
    for e in events:
        if e.epoch > upto:
            break
        out.append({"kind": "join" if isinstance(e, RankJoin) else "loss",
                    "rank": int(e.rank), "epoch": int(e.epoch)})
    return out


class EngineJoin:
    """One engine core's part in joins (module docstring)."""

    def __init__(self, engine: Any):
        from .groups import incarnation
        from .instance import instance_of
        from .liveness import membership_replica

        self.engine = engine
        cfg = engine.vllm_config
        self.rank = int(cfg.parallel_config.data_parallel_rank)
        self.joined = not is_replacement()
        self.latest = 0
        self.switches: list[dict] = []
        self.worker_switch: list[dict] = []
        self.core_switch: dict = {}
        self.heard_at = 0.0
        self.step_ends: deque[float] = deque(maxlen=65)
        """When this engine's last steps (or dummy passes) ended (``note_step``)."""
        self._measuring: dict | None = None
        """One record per switch of this engine: its worker RPC and its hello (ms)."""
        self._incarnation = incarnation
        _, instance = instance_of(cfg)
        self.replica = membership_replica(instance, int(cfg.parallel_config.data_parallel_size))
        self._lock = threading.Lock()
        self.held: list[tuple[str, Any]] = []
        """Requests (id, the engine's request item) that arrived before the flip."""
        self.held_total = 0
        self.flipped_by_request = 0
        """Flips a request that arrived before the join's news made (:meth:`catch_up`)."""
        from .groups import prepare_core_groups

        prepare_core_groups(cfg)  # a join's group connects before the switch needs it
        self.replica.on_join(self._news)
        for e in self.replica.events():  # a join published before we listened
            if isinstance(e, RankJoin):
                self._heard(e)

    # -- the news (the membership subscriber's thread)
    def _news(self, join) -> None:
        from .faults import injected_delay_s

        delay = injected_delay_s("RESILIENT_EP_JOIN_WAKE_DELAY_MS") if is_replacement() else 0
        if delay:  # fault injection: a replacement that hears of its admission late
            time.sleep(delay)
        self._heard(join)

    def _heard(self, join) -> None:
        from .replacement import takes_part

        if not takes_part(self.replica.events(), self.rank, join.epoch):
            return  # a join from before this process's own (a replacement replays the log)
        with self._lock:
            if join.epoch <= self.latest:
                return
            self.latest = join.epoch
            self.heard_at = time.monotonic()
        from vllm.v1.engine import EngineCoreRequestType

        self.engine.input_queue.put_nowait((EngineCoreRequestType.WAKEUP, None))

    def catch_up(self) -> None:
        """A replacement not joined yet: a join of its own that this process's replica has
        applied while its news (the subscriber's call of :meth:`_heard`) is still on the way,
        acted on now (the busy loop's thread, between two steps: :meth:`on_wake`)."""
        if self.joined:
            return
        for e in self.replica.events():
            if isinstance(e, RankJoin):
                self._heard(e)  # (it keeps the joins this process takes part in)
        self.on_wake()
        if self.joined:
            self.flipped_by_request += 1
            log.info("resilient-ep: DP%d got a request before the news of its join: joined "
                     "first", self.rank)

    def before_request(self, kind: str, rid: str | list[str], item: Any) -> bool:
        """Whether the engine takes a client request now (the busy loop's thread). A
        replacement before its flip: an ``add`` flips it first when its admission is known
        here, else is held (:meth:`take_held` hands it over after the flip); an ``abort``
        also drops the held requests it names. Anything else, and every request of a joined
        engine, is taken as it comes."""
        if self.joined:
            return True
        if kind == "abort":
            ids = {rid} if isinstance(rid, str) else set(rid)
            self.held = [(r, it) for r, it in self.held if r not in ids]
            return True
        if kind != "add":
            return True
        self.catch_up()
        if self.joined:
            return True
        self.held.append((str(rid), item))
        self.held_total += 1
        log.info("resilient-ep: DP%d got request %s before its join took effect here: held "
                 "until it has joined (%d held)", self.rank, rid, len(self.held))
        return False

    def take_held(self) -> list[Any]:
        """The requests held before the flip, in arrival order, once joined (else none)."""
        if not self.joined or not self.held:
            return []
        out, self.held = [it for _, it in self.held], []
        log.info("resilient-ep: DP%d joined: takes the %d request(s) it held", self.rank,
                 len(out))
        return out

    def pending(self) -> int:
        """The newest join epoch this engine has not switched to (0: none)."""
        return self.latest if self.latest > self._incarnation("core") else 0

    # -- the busy loop's thread
    def on_wake(self) -> None:
        """A wake-up from :meth:`_heard`: the replacement flips when the join is its own; a
        survivor that idles runs one pass, to reach the sum where the survivors agree."""
        epoch = self.pending()
        if not epoch:
            return
        if not self.joined:
            if self.replica.membership.view().is_live(self.rank):
                self._flip(epoch)
            return
        if not self.engine.engines_running:
            self.engine.engines_running = True

    def after_sum(self, got: dict, has_unfinished: bool) -> None:
        """A survivor, after the busy sum whose contributions ``got`` carry each survivor's
        newest join: when all name the same one, switch to it now and tell the joined rank
        where the survivors are."""
        joins = {int(t[0][2]) for t in got.values()}
        if len(joins) != 1 or not self.joined:
            return
        epoch = joins.pop()
        if epoch <= self._incarnation("core"):
            return
        t0 = time.monotonic()
        core, workers_done = self._switch(epoch)
        t1 = time.monotonic()
        e = self.engine
        mine = torch.tensor([e.step_counter, e.current_wave, int(has_unfinished)],
                            dtype=torch.int64)
        core.allgather([mine], strict=False)
        t2 = time.monotonic()
        workers_done()
        t3 = time.monotonic()
        record = {"epoch": epoch, "switch_ms": (t1 - t0) * 1e3, "hello_ms": (t2 - t1) * 1e3,
                  "workers_wait_ms": (t3 - t2) * 1e3, "at": t0,
                  "heard_ms_before": (t0 - self.heard_at) * 1e3,
                  "workers": self.worker_switch, "core": self.core_switch}
        self.switches.append(record)
        if _has_requests(e):  # (an idle engine's next step waits for work, not for the join)
            self._measuring = record
        log.info("resilient-ep: DP%d switched to the groups of join epoch %d at step %d of "
                 "wave %d (switch %.1f ms; hello with the joined rank %.1f ms; then waited "
                 "%.1f ms for the workers, whose switch took %s)", self.rank, epoch,
                 e.step_counter, e.current_wave, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                 (t3 - t2) * 1e3, self.worker_switch)

    def note_step(self) -> None:
        """A step (or a dummy pass) of this engine ended. The first one after a switch made
        with requests running gives the join's cost to this engine: the time from the end of
        the step before the switch to the end of this one, less the median step before
        (``pause_ms``)."""
        now = time.monotonic()
        m = self._measuring
        if m is not None and self.step_ends:
            self._measuring = None
            gaps = [b - a for a, b in zip(self.step_ends, list(self.step_ends)[1:])]
            step = statistics.median(gaps) if gaps else 0.0
            m["step_ms"] = step * 1e3
            m["first_step_after_ms"] = (now - self.step_ends[-1]) * 1e3
            m["pause_ms"] = max(0.0, now - self.step_ends[-1] - step) * 1e3
            self.step_ends.clear()  # the join's gap is not a step
        self.step_ends.append(now)

    def _switch(self, epoch: int):
        """Switch this engine core's group to the join's, and send its workers theirs
        without waiting: the executor's queue runs the workers' switch before any later call
        (the next step), so it overlaps this core's switch and hello. Returns the core group
        and the call that waits for the workers (it must come before the next step)."""
        from .groups import switch_core_group, switch_parts

        history = history_of(self.replica.events(), epoch)
        pending = self.engine.model_executor.collective_rpc(
            "resilient_ep_switch_groups", args=(epoch, history), non_block=True)
        t = time.monotonic()
        core = switch_core_group(self.engine.vllm_config, epoch)
        self.core_switch = {"ms": round((time.monotonic() - t) * 1e3, 2),
                            **{k: round(v, 2) if isinstance(v, float) else v
                               for k, v in switch_parts.get("core", {}).items()}}

        def workers_done() -> None:
            got = pending.result()  # (every vLLM executor answers a non-blocking call so)
            self.worker_switch = [{**{k: round(w[k], 2) for k in ("experts_ms", "group_ms")},
                                   "group_parts": w.get("group_parts"),
                                   "experts_prepared": w.get("experts_prepared")} for w in got]

        return core, workers_done

    def _flip(self, epoch: int) -> None:
        """The replacement: switch to the join's groups, learn where the survivors are, take
        their step count and wave."""
        t0 = time.monotonic()
        core, workers_done = self._switch(epoch)
        t1 = time.monotonic()
        none = torch.tensor([-1, -1, -1], dtype=torch.int64)
        got = core.allgather([none], strict=False)
        t2 = time.monotonic()
        workers_done()
        record = {"epoch": epoch, "switch_ms": (t1 - t0) * 1e3, "hello_ms": (t2 - t1) * 1e3,
                  "workers_wait_ms": (time.monotonic() - t2) * 1e3, "at": t0,
                  "heard_ms_before": (t0 - self.heard_at) * 1e3,
                  "workers": self.worker_switch, "core": self.core_switch}
        self.switches.append(record)
        self._measuring = record  # its first step with the survivors
        theirs = [t[0] for r, t in got.items() if r != self.rank and int(t[0][0]) >= 0]
        e = self.engine
        self.joined = True
        if not theirs:  # nobody else is left: run alone from a fresh wave
            e.step_counter, e.engines_running = 0, False
            log.warning("resilient-ep: DP%d joined at epoch %d with no survivor", self.rank,
                        epoch)
            return
        step, wave, busy = (int(x) for x in theirs[0].tolist())
        e.step_counter, e.current_wave = step, wave
        if busy:
            e.engines_running = True
        else:  # the wave the survivors just ended
            e.engines_running, e.step_counter, e.current_wave = False, 0, wave + 1
        log.info("resilient-ep: DP%d joined at epoch %d: step %d of wave %d, busy %s",
                 self.rank, epoch, step, wave, bool(busy))


def _has_requests(engine: Any) -> bool:
    scheduler = getattr(engine, "scheduler", None)
    try:
        return bool(scheduler.has_requests())
    except Exception:
        return False


_joins: dict[int, EngineJoin] = {}


def engine_join(engine: Any) -> EngineJoin:
    """The engine core's :class:`EngineJoin` (made on first use)."""
    j = _joins.get(id(engine))
    if j is None:
        j = _joins[id(engine)] = EngineJoin(engine)
    return j
