"""The fallback when a step that lost a data-parallel peer cannot be re-run in place.

Normally the workers re-run such a step themselves (``step_rerun.py``) and the engine core
never sees the failure. Only when a re-run is impossible (the step lost peers
``step_rerun.MAX_RERUNS`` times over, or a worker reported the loss as an error) does the
error reach ``EngineCore.step``, and this module undoes the step. Each use is counted
(``RECOVERIES``, ``/resilience/status`` -> ``counters``).

The failed step's forward pass may have run some layers; its tokens were never sampled. The
scheduler had already advanced each scheduled request as if the step would succeed. We undo
that the way vLLM itself undoes a preemption: every running request goes back to the waiting
queue with its KV blocks freed and is recomputed (prompt + tokens generated so far) on the
next step, now with the surviving membership. The prefix cache is reset too (a block filled
by the failed step is not trustworthy). Nothing is lost: requests keep their ids and output
tokens; the cost is one prefill per request that was running here.
"""

from __future__ import annotations

import logging
import time

from .step_rerun import is_peer_lost

__all__ = ["is_peer_lost", "recover_scheduler", "fence_self", "RECOVERIES"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler

RECOVERIES: list[dict] = []
"""One record per recovered step in this process (time, requests recomputed)."""


def recover_scheduler(scheduler, reason: BaseException) -> int:
    """Send every running request back for recompute; returns how many."""
    running = list(getattr(scheduler, "running", ()))
    for req in running:
        # The failed step never reaches update_from_output, which would have taken its
        # tokens off the in-flight count (the CPU backend schedules synchronously).
        if hasattr(req, "num_in_flight_tokens"):
            req.num_in_flight_tokens = 0
    ok = scheduler.reset_prefix_cache(reset_running_requests=True)
    for req in running:
        if hasattr(req, "num_stale_output_tokens"):
            req.num_stale_output_tokens = 0
            req.drop_stale_output = False
    RECOVERIES.append({"time": time.time(), "requests": len(running), "prefix_reset": ok})
    log.warning("resilient-ep: a data-parallel peer was lost during a step (%s); "
                "%d running request(s) will be recomputed", str(reason).splitlines()[0][:200],
                len(running))
    return len(running)


def fence_self(vllm_config, why: str) -> None:
    """End this engine rank now: its workers (SIGKILL), then this process. The front end
    sees the engine core's sentinel and fails the rank over (``frontend.py``)."""
    import os

    import psutil

    dp_rank = vllm_config.parallel_config.data_parallel_rank
    log.error("resilient-ep: engine rank DP%s fences itself: %s", dp_rank, why)
    from .fencing import kill_all

    try:
        kill_all(psutil.Process().children(recursive=True))
    except psutil.Error:
        pass
    os._exit(70)
