"""What an engine-core process does when its workers lose a data-parallel peer mid-step.

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

from resilient_ep.transport.group import PEER_LOST_MARK

__all__ = ["is_peer_lost", "recover_scheduler", "RECOVERIES"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler

RECOVERIES: list[dict] = []
"""One record per recovered step in this process (time, requests recomputed)."""


def is_peer_lost(exc: BaseException) -> bool:
    while exc is not None:
        if PEER_LOST_MARK in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
