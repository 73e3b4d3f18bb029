"""Ledger entry ``vllm-engine-core-failover`` (patches/vllm-engine-core-failover.md).

Why: an engine-core process of a DP+EP instance stops for good when (a) a step fails because
its workers lost a DP peer (``EngineCore.step`` re-raises, the busy loop dies), (b) the same
happens in the dummy pass idle ranks run to keep in step (``execute_dummy_batch``), or
(c) the "anyone busy?" all-reduce over the gloo DP group
(``DPEngineCoreProc._has_global_unfinished_reqs`` -> ``ParallelConfig.sync_dp_state``)
meets a dead peer.

How (only when resilience is on with DP > 1 and EP; otherwise the originals run):
(a) a step whose error carries the lost-peer mark recovers the scheduler
(:func:`~resilient_ep.engines.vllm.engine_core.recover_scheduler`: running requests are
preempted and recomputed) and reports "nothing executed"; (b) such a dummy pass is dropped;
(c) the same sum runs over the engine-core failover group among the live engines (pause
consensus = every *live* engine pausing); it also carries the newest join each engine knows,
so the survivors switch to a joined rank's groups after the same sum (``joining.py``). Any other error propagates unchanged. And
``DPEngineCoreProc.run_busy_loop`` first starts the engine's liveness beacon
(``beacon.py``), by which the front end fences a frozen engine. (d) ``EngineCoreProc.
_send_engine_dead`` (a worker died or raised, so the executor failed) fences this rank (its
workers, then itself) instead of sending vLLM's instance-wide ``ENGINE_CORE_DEAD``; the front
end sees the engine core exit and fails over this one rank. And ``EngineCore`` gains the
utility ``resilient_ep_counters`` (the status endpoint's ``counters``). (e) Across nodes
(``multinode.py``), ``step`` holds while the engine's lease has run out, before it runs and
before its outputs are handed on.
"""

from __future__ import annotations

import functools
import inspect
import logging

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-engine-core-failover"
TARGET_MODULE = "vllm.v1.engine.core"

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


def _classes():
    from vllm.v1.engine.core import DPEngineCoreProc, EngineCore

    return EngineCore, DPEngineCoreProc


def _proc_class():
    from vllm.v1.engine.core import EngineCoreProc

    return EngineCoreProc


def check() -> None:
    check_version(NAME)
    core, dp = _classes()
    expect_signature(NAME, core.step, ("self",))
    expect_signature(NAME, core.execute_dummy_batch, ("self",))
    expect_signature(NAME, dp._has_global_unfinished_reqs, ("self", "local_unfinished"))
    expect_signature(NAME, dp.run_busy_loop, ("self",))
    expect_signature(NAME, _proc_class()._send_engine_dead, ("self",))
    expect_signature(NAME, _proc_class()._process_input_queue, ("self",))
    # The wave messages a dead rank 0 no longer sends, as run_busy_loop sends them (the method
    # is wrapped by vLLM's fault_tolerant_wrapper, so its source is read, not its code).
    source = inspect.getsource(dp)
    for text in ("if self.dp_rank == 0 or not self.has_coordinator:",
                 "EngineCoreOutputs(wave_complete=self.current_wave)",
                 "EngineCoreOutputs(start_wave=self.current_wave)"):
        if text not in source:
            from . import PatchError

            raise PatchError(f"{NAME}: DPEngineCoreProc no longer has {text!r}")
    for attr in ("step_counter", "dp_sync_interval", "pending_pause", "ignore_start_dp_wave"):
        if attr not in dp.__init__.__code__.co_names and attr not in \
                dp._has_global_unfinished_reqs.__code__.co_names:
            from . import PatchError

            raise PatchError(f"{NAME}: DPEngineCoreProc no longer uses {attr}")


def is_applied() -> bool:
    core, dp = _classes()
    return is_marked(core.__dict__.get("step"), NAME)


def _on(self) -> bool:
    flag = getattr(self, "_resilient_failover", None)
    if flag is None:
        from ..instance import failover_enabled

        flag = self._resilient_failover = failover_enabled(self.vllm_config)
    return flag


def _lead_waves_for_a_dead_rank_0(engine, group, running: bool) -> None:
    """vLLM's DP rank 0 tells the coordinator when a wave of work ends (``wave_complete``)
    and when a new one starts (``start_wave``); the other ranks never do
    (``run_busy_loop``). With rank 0 lost nobody would, and idle survivors would not be woken
    for the dummy passes a busy rank's collectives need. So the lowest live rank says it
    instead, exactly where rank 0 would have."""
    if not engine.has_coordinator or 0 not in group.dead or engine.dp_rank == 0:
        return
    if engine.dp_rank != min(group.live):
        return
    from vllm.v1.engine import EngineCoreOutputs

    if not running:
        engine.output_queue.put_nowait((-1, EngineCoreOutputs(wave_complete=engine.current_wave)))
    elif not getattr(engine, "_resilient_was_running", True) and not engine.pending_pause:
        engine.output_queue.put_nowait((-1, EngineCoreOutputs(start_wave=engine.current_wave)))


def apply() -> None:
    import torch

    from ..engine_core import is_peer_lost, recover_scheduler

    core, dp = _classes()
    orig_step = core.__dict__["step"]
    if is_marked(orig_step, NAME):
        return
    orig_dummy = core.__dict__["execute_dummy_batch"]
    orig_sync = dp.__dict__["_has_global_unfinished_reqs"]

    from ..joining import _joins

    @functools.wraps(orig_step)
    def step(self):
        from ..beacon import leased_hold

        leased_hold(self)  # across nodes: no step without a lease
        try:
            out = orig_step(self)
        except Exception as e:
            if not (_on(self) and is_peer_lost(e)):
                raise
            recover_scheduler(self.scheduler, e)
            return {}, False
        finally:
            join = _joins.get(id(self))
            if join is not None:  # (what a join costs this engine: joining.note_step)
                join.note_step()
        leased_hold(self)  # ... and no output leaves without one
        return out

    @functools.wraps(orig_dummy)
    def execute_dummy_batch(self):
        try:
            return orig_dummy(self)
        except Exception as e:
            if not (_on(self) and is_peer_lost(e)):
                raise
            log.warning("resilient-ep: dummy pass dropped, a DP peer was lost")
        finally:
            join = _joins.get(id(self))
            if join is not None:
                join.note_step()

    @functools.wraps(orig_sync)
    def _has_global_unfinished_reqs(self, local_unfinished):
        if not _on(self):
            return orig_sync(self, local_unfinished)
        from ..groups import core_group

        self.step_counter += 1
        if self.step_counter != 1 and self.step_counter % self.dp_sync_interval != 0:
            return True
        from ..joining import engine_join

        group = core_group(self.vllm_config)
        join = engine_join(self)
        mine = torch.tensor([int(local_unfinished), int(self.pending_pause), join.pending()],
                            dtype=torch.int32)
        got = group.allgather([mine], strict=False)
        total = sum(t[0] for t in got.values())
        live = len(got)
        pauses = int(total[1])
        has_unfinished = int(total[0]) > 0 or pauses % live != 0
        if pauses == live:
            self.ignore_start_dp_wave = True
            self.pending_pause = False
        _lead_waves_for_a_dead_rank_0(self, group, has_unfinished)
        join.after_sum(got, has_unfinished)  # every survivor names the same join: switch now
        return has_unfinished

    orig_input = proc_cls_input = _proc_class().__dict__["_process_input_queue"]

    @functools.wraps(orig_input)
    def _process_input_queue(self):
        # what run_busy_loop calls ``was_running`` (read by the wave bookkeeping below)
        self._resilient_was_running = getattr(self, "engines_running", False)
        return orig_input(self)

    _proc_class()._process_input_queue = mark(_process_input_queue, NAME, proc_cls_input)

    orig_loop = dp.__dict__["run_busy_loop"]

    @functools.wraps(orig_loop)
    def run_busy_loop(self):
        if _on(self):
            from ..beacon import start_beacon

            start_beacon(self.vllm_config)  # the front end fences an engine that goes silent
        return orig_loop(self)

    proc_cls = _proc_class()
    orig_dead = proc_cls.__dict__["_send_engine_dead"]

    @functools.wraps(orig_dead)
    def _send_engine_dead(self):
        if not _on(self):
            return orig_dead(self)
        # vLLM would tell the front end "engine dead" on the shared output socket, which
        # names no engine: the front end would take every rank down. This rank fences itself
        # instead (its workers first), and the front end fails over the one rank it lost.
        from ..engine_core import fence_self

        fence_self(self.vllm_config, "its executor failed (a worker died or raised)")

    def resilient_ep_counters(self):
        """Utility (``call_utility``): this engine's failover counters and its workers'."""
        from ..engine_core import RECOVERIES
        from ..groups import current_core_group

        try:
            workers = self.model_executor.collective_rpc("resilient_ep_counters", timeout=5)
        except Exception as e:  # a worker that does not answer
            workers = [{"error": repr(e)}]
        from ..joining import _joins

        join = _joins.get(id(self))
        return {"dp_rank": int(self.vllm_config.parallel_config.data_parallel_rank),
                "fallback_recoveries": len(RECOVERIES),
                "fallback_requests_recomputed": sum(r["requests"] for r in RECOVERIES),
                **_group_view(current_core_group()), "workers": workers,
                "join_switches": list(join.switches) if join is not None else [],
                "requests_before_join": {"held": join.held_total,
                                         "flipped_by_request": join.flipped_by_request}
                if join is not None else {}}

    def _group_view(group):
        return {} if group is None else {"epoch": group.epoch, "live": group.live,
                                         "dropped": dict(group.dropped)}

    proc_cls._send_engine_dead = mark(_send_engine_dead, NAME, orig_dead)
    core.resilient_ep_counters = resilient_ep_counters
    dp.run_busy_loop = mark(run_busy_loop, NAME, orig_loop)
    core.step = mark(step, NAME, orig_step)
    core.execute_dummy_batch = mark(execute_dummy_batch, NAME, orig_dummy)
    dp._has_global_unfinished_reqs = mark(_has_global_unfinished_reqs, NAME, orig_sync)
