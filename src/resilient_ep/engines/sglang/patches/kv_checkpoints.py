"""KV checkpoints of the running requests, and restore of a moved one (failover path;
``HookRegistry`` AFTER hooks, not a ledger entry; the logic is ``kv.py``).

Why: SGLang has no way to checkpoint a running request's KV outside the GPU (HiCache, its
hierarchical cache, needs CUDA and does not run on the CPU backend), so a request moved off a
lost rank would prefill its prompt and every generated token again.

How (SGLang's ``HookRegistry``):
- ``Scheduler.process_batch_result`` (AFTER): after each step, the running decode requests
  that are due are checkpointed by the core's ``KVCheckpointer`` (background thread);
  finished ones are forgotten (their copies deleted);
- ``Scheduler._add_request_to_queue`` (AFTER): a request the front end moved here (an
  incarnation ``<rid>@<n>``) gets its newest verified checkpoint written into fresh KV slots
  and inserted into SGLang's radix cache before it is scheduled; SGLang's prefix matching
  then computes only the tail.
"""

from __future__ import annotations

import logging

from ..instance import current, failover_on
from . import check_version, expect_signature, hooks_installed, install_hooks, unwrapped

NAME = "sglang-kv-checkpoints"
TARGET_MODULE = "sglang.srt.managers.scheduler"
_RESULT = f"{TARGET_MODULE}.Scheduler.process_batch_result"
_QUEUE = f"{TARGET_MODULE}.Scheduler._add_request_to_queue"

log = logging.getLogger(__name__)



def check() -> None:
    check_version(NAME)
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams

    expect_signature(NAME, unwrapped(Scheduler.process_batch_result), ("self", "batch", "result"))
    expect_signature(NAME, unwrapped(Scheduler._add_request_to_queue),
                     ("self", "req", "is_retracted"))
    if "key" not in InsertParams.__dataclass_fields__ or "value" not in InsertParams.__dataclass_fields__:
        from . import PatchError

        raise PatchError(f"{NAME}: InsertParams has no key/value; see docs/sglang.md")



def _kv_on() -> bool:
    return failover_on() and current()[0].kv_checkpoint.enabled


def after_batch_result(result, self, batch, batch_result):
    if _kv_on():
        from ..kv import checkpoints_for

        ckpt = checkpoints_for(self)
        if ckpt is not None:
            try:
                ckpt.after_step(self, batch)
            except Exception:  # a checkpoint must never cost a step
                ckpt.step_errors += 1
                if ckpt.step_errors <= 3:
                    log.exception("resilient-ep: KV checkpoint step failed (%d so far)",
                                  ckpt.step_errors)
    return result


def after_add_request(result, self, req, is_retracted=False):
    if not _kv_on() or is_retracted:
        return result
    from ..instance import INCARNATION_SEP

    if INCARNATION_SEP not in (req.rid or ""):
        return result
    from ..kv import checkpoints_for
    from ..scheduler import write_rank_file

    tree = getattr(self, "tree_cache", None)
    if tree is None or getattr(tree, "disable", False) or not hasattr(tree, "insert"):
        log.warning("resilient-ep: no radix cache here (--disable-radix-cache?): %s recomputes "
                    "its prefix", req.rid)
        return result
    ckpt = checkpoints_for(self)
    if ckpt is not None:
        try:
            ckpt.restore_into_tree(self, req)
        except Exception:  # recompute instead
            log.exception("resilient-ep: restoring %s from its KV checkpoint failed", req.rid)
        write_rank_file()
    return result


HOOKS = ((_RESULT, after_batch_result, "AFTER"), (_QUEUE, after_add_request, "AFTER"))


def is_applied() -> bool:
    return hooks_installed(HOOKS)


def apply() -> None:
    install_hooks(NAME, HOOKS)
