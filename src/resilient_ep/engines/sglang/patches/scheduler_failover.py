"""A scheduler that lost a peer re-runs its step; one that fails fences itself (failover path;
``HookRegistry`` hooks, not a ledger entry).

Why: SGLang's scheduler has no notion of a lost peer. A collective of its step that loses a
rank raises, the exception ends the event loop, and ``run_scheduler_process`` sends SIGQUIT
to the launcher, which takes the whole instance down.

How: AROUND hooks (SGLang's ``HookRegistry``):
- ``Scheduler.run_batch``: a step whose collectives raise
  :class:`~resilient_ep.transport.group.PeerLost` is run again on the same batch after the
  batch-size sync is redone among the survivors (``scheduler.resync``); a batch that is only
  the idle filler of DP attention is skipped when no live rank has tokens any more. At most
  ``scheduler.MAX_RERUNS`` times per step (each needs one more lost rank).
- ``Scheduler.run_event_loop``: any other exception of a failover-enabled scheduler ends this
  process with exit code 70 instead of the instance-wide SIGQUIT: the front end's liveness
  monitor sees the rank go and fails it over like a crash.
"""

from __future__ import annotations

import logging
import os
import time

from resilient_ep.transport.group import is_peer_lost

from ..instance import failover_on
from . import check_version, expect_signature, hooks_installed, install_hooks, unwrapped

NAME = "sglang-scheduler-failover"
TARGET_MODULE = "sglang.srt.managers.scheduler"
_RUN = f"{TARGET_MODULE}.Scheduler.run_batch"
_LOOP = f"{TARGET_MODULE}.Scheduler.run_event_loop"
FENCE_EXIT_CODE = 70

log = logging.getLogger(__name__)


def _cls():
    from sglang.srt.managers.scheduler import Scheduler

    return Scheduler



def check() -> None:
    check_version(NAME)
    cls = _cls()
    expect_signature(NAME, unwrapped(cls.run_batch), ("self", "batch", "pp_proxy_tensors"))
    expect_signature(NAME, unwrapped(cls.run_event_loop), ("self",))
    from sglang.srt.managers.utils import GenerationBatchResult

    GenerationBatchResult()  # the empty result of a skipped idle step must still build



def run_batch(original, self, batch, pp_proxy_tensors=None):
    if not failover_on():
        return original(self, batch, pp_proxy_tensors)
    from ..groups import COUNTERS
    from ..scheduler import MAX_RERUNS, resync, write_rank_file

    t0 = None
    for attempt in range(MAX_RERUNS + 1):
        try:
            out = original(self, batch, pp_proxy_tensors)
            if t0 is not None:
                COUNTERS["rerun_s"] += time.monotonic() - t0
                write_rank_file()
            return out
        except Exception as e:
            if not is_peer_lost(e) or attempt == MAX_RERUNS:
                raise
            t0 = t0 or time.monotonic()
            COUNTERS["step_reruns"] += 1
            log.warning("resilient-ep: a peer was lost during a step (%s); running it again "
                        "among the live ranks", str(e).splitlines()[0][:160])
            resync(self, batch)
            if batch.forward_mode.is_idle() and max(batch.global_num_tokens or [0]) == 0:
                from sglang.srt.managers.utils import GenerationBatchResult

                COUNTERS["idle_skips"] += 1
                COUNTERS["rerun_s"] += time.monotonic() - t0
                write_rank_file()
                return GenerationBatchResult()
    raise AssertionError("unreachable")


def run_event_loop(original, self):
    if not failover_on():
        return original(self)
    try:
        return original(self)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        log.exception("resilient-ep: this scheduler failed (%s); fencing it (exit %d) so the "
                      "instance fails it over", type(e).__name__, FENCE_EXIT_CODE)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(FENCE_EXIT_CODE)


HOOKS = ((_RUN, run_batch, "AROUND"), (_LOOP, run_event_loop, "AROUND"))


def is_applied() -> bool:
    return hooks_installed(HOOKS)


def apply() -> None:
    install_hooks(NAME, HOOKS)
