"""Re-run a step in place when a data-parallel peer is lost during it (worker side).

A step of a DP + EP instance runs collectives with the other DP ranks: the token-count
exchange before the forward (``dp_utils._run_ar``) and the MoE dispatch/combine of every
layer. When a rank dies mid-step, every survivor's next collective raises
:class:`~resilient_ep.transport.group.PeerLost` (the group moved to a new epoch, see
``transport/group.py``). Nothing of the step was sampled yet, and what it wrote is
idempotent: the KV of the step's own positions, at slots the scheduler already chose. So the
survivor runs the *same* scheduler output again, now with the smaller membership: same
inputs, the step's KV rewritten, nothing preempted, no prefix-cache reset, nothing
recomputed but this one step.

Survivors line up again by construction: each one re-runs the step it was in (not the same
step number everywhere: data-parallel ranks run different requests), and every re-run begins
with the token-count exchange at sequence 0 of the new epoch.

The model runner's persistent batch was already updated for this scheduler output by the
failed attempt (``_update_states``: new requests added, block ids appended); applying it
twice would duplicate them, so the re-run skips that update and reuses its result. Inputs
are then prepared again from the persistent state, which the failed attempt did not change
beyond rewriting the same buffers.

Counted (``COUNTERS``): re-runs, steps that gave up after ``MAX_RERUNS`` (the engine core then
falls back to preempting its running requests, see ``engine_core.py``).
"""

from __future__ import annotations

import logging
import time

from resilient_ep.transport.group import is_peer_lost

__all__ = ["COUNTERS", "MAX_RERUNS", "is_peer_lost", "rerun_on_peer_lost"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler

MAX_RERUNS = 8
"""Re-runs of one step before giving up (each needs one more rank lost during the step)."""

COUNTERS = {"step_reruns": 0, "dummy_reruns": 0, "reruns_exhausted": 0, "rerun_s": 0.0}
"""This worker process's re-run counts (read by ``resilient_ep_counters``)."""


JOIN_PASSES: list[dict] = []
"""The first passes of this worker after each switch to a join's groups: how long each took
and how much of it its collectives spent in the group (waiting for the others included)."""
_watch = {"left": 0}


def watch_next_passes(n: int = 3) -> None:
    """Record the next ``n`` passes in :data:`JOIN_PASSES` (a join's switch calls it)."""
    _watch["left"] = n


def _timed(run, kind: str):
    if not _watch["left"]:
        return run()
    from .groups import current_worker_group

    group = current_worker_group()
    c0 = group.collective_s if group is not None else 0.0
    t0 = time.monotonic()
    try:
        return run()
    finally:
        _watch["left"] -= 1
        JOIN_PASSES.append({"kind": kind, "ms": (time.monotonic() - t0) * 1e3,
                            "collectives_ms": ((group.collective_s - c0) * 1e3
                                               if group is not None else None)})
        del JOIN_PASSES[:-30]


def rerun_on_peer_lost(run, kind: str, before_rerun=None):
    """``run()``, run again while it fails with a lost peer (at most ``MAX_RERUNS`` times).

    ``before_rerun()`` prepares the owner for a re-run of the same inputs."""
    attempt = 0
    t0 = None
    while True:
        try:
            out = _timed(run, kind)
            if t0 is not None:
                COUNTERS["rerun_s"] += time.monotonic() - t0
            return out
        except Exception as e:
            if not is_peer_lost(e):
                raise
            if attempt >= MAX_RERUNS:
                COUNTERS["reruns_exhausted"] += 1
                raise
            attempt += 1
            t0 = t0 or time.monotonic()
            COUNTERS[f"{kind}_reruns"] += 1
            log.warning("resilient-ep: a data-parallel peer was lost during a %s; running it "
                        "again in place (%s)", kind, str(e).splitlines()[0][:160])
            if before_rerun is not None:
                before_rerun()
