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
consensus = every *live* engine pausing). Any other error propagates unchanged. And
``DPEngineCoreProc.run_busy_loop`` first starts the engine's liveness beacon
(``beacon.py``), by which the front end fences a frozen engine.
"""

from __future__ import annotations

import functools
import logging

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-engine-core-failover"
TARGET_MODULE = "vllm.v1.engine.core"

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


def _classes():
    from vllm.v1.engine.core import DPEngineCoreProc, EngineCore

    return EngineCore, DPEngineCoreProc


def check() -> None:
    check_version(NAME)
    core, dp = _classes()
    expect_signature(NAME, core.step, ("self",))
    expect_signature(NAME, core.execute_dummy_batch, ("self",))
    expect_signature(NAME, dp._has_global_unfinished_reqs, ("self", "local_unfinished"))
    expect_signature(NAME, dp.run_busy_loop, ("self",))
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
        from ..groups import failover_enabled

        flag = self._resilient_failover = failover_enabled(self.vllm_config)
    return flag


def apply() -> None:
    import torch

    from ..engine_core import is_peer_lost, recover_scheduler

    core, dp = _classes()
    orig_step = core.__dict__["step"]
    if is_marked(orig_step, NAME):
        return
    orig_dummy = core.__dict__["execute_dummy_batch"]
    orig_sync = dp.__dict__["_has_global_unfinished_reqs"]

    @functools.wraps(orig_step)
    def step(self):
        try:
            return orig_step(self)
        except Exception as e:
            if not (_on(self) and is_peer_lost(e)):
                raise
            recover_scheduler(self.scheduler, e)
            return {}, False

    @functools.wraps(orig_dummy)
    def execute_dummy_batch(self):
        try:
            return orig_dummy(self)
        except Exception as e:
            if not (_on(self) and is_peer_lost(e)):
                raise
            log.warning("resilient-ep: dummy pass dropped, a DP peer was lost")

    @functools.wraps(orig_sync)
    def _has_global_unfinished_reqs(self, local_unfinished):
        if not _on(self):
            return orig_sync(self, local_unfinished)
        from ..groups import core_group

        self.step_counter += 1
        if self.step_counter != 1 and self.step_counter % self.dp_sync_interval != 0:
            return True
        group = core_group(self.vllm_config)
        mine = torch.tensor([int(local_unfinished), int(self.pending_pause)], dtype=torch.int32)
        got = group.allgather([mine], strict=False)
        total = sum(t[0] for t in got.values())
        live = len(got)
        pauses = int(total[1])
        has_unfinished = int(total[0]) > 0 or pauses % live != 0
        if pauses == live:
            self.ignore_start_dp_wave = True
            self.pending_pause = False
        return has_unfinished

    orig_loop = dp.__dict__["run_busy_loop"]

    @functools.wraps(orig_loop)
    def run_busy_loop(self):
        if _on(self):
            from ..beacon import start_beacon

            start_beacon(self.vllm_config)  # the front end fences an engine that goes silent
        return orig_loop(self)

    dp.run_busy_loop = mark(run_busy_loop, NAME, orig_loop)
    core.step = mark(step, NAME, orig_step)
    core.execute_dummy_batch = mark(execute_dummy_batch, NAME, orig_dummy)
    dp._has_global_unfinished_reqs = mark(_has_global_unfinished_reqs, NAME, orig_sync)
