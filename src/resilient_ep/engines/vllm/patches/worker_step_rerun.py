"""Ledger entry ``vllm-worker-step-rerun`` (patches/vllm-worker-step-rerun.md).

Why: a step whose collectives lost a DP peer fails in the worker with ``PeerLost``. Letting
it reach the engine core means undoing the scheduler's work for that step, which vLLM can
only do by preempting every running request (their KV freed and recomputed). The step's
inputs are still valid, so the worker can run it again with the new membership instead.

How (only where the worker failover group exists, i.e. resilience on, DP > 1, EP):
``GPUModelRunner.execute_model`` (the CPU model runner inherits it) runs again on
``PeerLost`` with the same scheduler output (:mod:`..step_rerun`); ``_update_states`` is
skipped on the re-run of the scheduler output it already applied, and returns what it
returned then; ``Worker.execute_dummy_batch`` (the pass an idle DP rank runs to keep its
peers' collectives in step) runs again likewise. Otherwise the originals run.
"""

from __future__ import annotations

import functools

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-worker-step-rerun"
TARGET_MODULE = "vllm.v1.worker.gpu_model_runner"


def _targets():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    return GPUModelRunner, Worker


def check() -> None:
    check_version(NAME)
    runner, worker = _targets()
    expect_signature(NAME, runner.execute_model,
                     ("self", "scheduler_output", "intermediate_tensors"))
    expect_signature(NAME, runner._update_states, ("self", "scheduler_output"))
    expect_signature(NAME, worker.execute_dummy_batch, ("self",))
    import inspect

    if "_update_states" not in inspect.unwrap(runner.execute_model).__code__.co_names:
        from . import PatchError

        raise PatchError(f"{NAME}: GPUModelRunner.execute_model no longer calls _update_states")


def is_applied() -> bool:
    runner, _ = _targets()
    return is_marked(runner.__dict__.get("execute_model"), NAME)


_tp1: bool | None = None  # TP = 1 in this worker (asked once: it never changes)


def _active() -> bool:
    global _tp1
    from ..groups import current_worker_group

    if current_worker_group() is None:
        return False
    if _tp1 is None:
        from vllm.distributed import get_tensor_model_parallel_world_size

        # With TP > 1 the TP workers of one rank may learn of the loss in different layers
        # while gloo TP collectives sit between them: a re-run could pair one worker's first
        # collective with its peer's pending one. There the step goes to the engine core's
        # preemption.
        _tp1 = get_tensor_model_parallel_world_size() == 1
    return _tp1


def apply() -> None:
    from ..step_rerun import rerun_on_peer_lost

    runner, worker = _targets()
    orig_exec = runner.__dict__["execute_model"]
    if is_marked(orig_exec, NAME):
        return
    orig_update = runner.__dict__["_update_states"]
    orig_dummy = worker.__dict__["execute_dummy_batch"]

    @functools.wraps(orig_update)
    def _update_states(self, scheduler_output):
        replay = getattr(self, "_resilient_replay", None)
        if replay is not None and replay[0] is scheduler_output:
            return replay[1]  # applied by the failed attempt of this very step
        out = orig_update(self, scheduler_output)
        self._resilient_applied = (scheduler_output, out)
        return out

    from .. import faults

    @functools.wraps(orig_exec)
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        if not _active():
            return orig_exec(self, scheduler_output, intermediate_tensors)
        if faults.enabled() and scheduler_output.total_num_scheduled_tokens:
            from ..instance import instance_of

            faults.maybe_fault(instance_of(self.vllm_config)[1],
                               int(self.vllm_config.parallel_config.data_parallel_rank))

        def again():
            applied = getattr(self, "_resilient_applied", None)
            if applied is not None and applied[0] is scheduler_output:
                self._resilient_replay = applied
            self.execute_model_state = None

        try:
            return rerun_on_peer_lost(
                lambda: orig_exec(self, scheduler_output, intermediate_tensors), "step", again)
        finally:
            self._resilient_replay = None

    @functools.wraps(orig_dummy)
    def execute_dummy_batch(self):
        if not _active():
            return orig_dummy(self)
        return rerun_on_peer_lost(lambda: orig_dummy(self), "dummy")

    runner._update_states = mark(_update_states, NAME, orig_update)
    runner.execute_model = mark(execute_model, NAME, orig_exec)
    worker.execute_dummy_batch = mark(execute_dummy_batch, NAME, orig_dummy)
