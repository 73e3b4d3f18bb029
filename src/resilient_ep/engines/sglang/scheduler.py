"""The failover side of one SGLang scheduler process (one attention-DP / EP rank).

:func:`on_model_loaded` (after ``ModelRunner.load_model``, when SGLang's expert tables and
the weights of every expert slot are in place) sets this scheduler up:

- its failover group (``groups.py``), which from then on carries the TP-group collectives
  (``patches/tp_collectives.py``, ``patches/dp_batch_sync.py``), and its beacon;
- the core's active expert map over SGLang's ``ExpertLocationMetadata`` (``experts.py``);
- the listeners that apply a membership change: the active map and SGLang's own
  ``tp_group.active_ranks`` masks (a masked rank's row of the batch-size sync reads as idle);
- ``rank-<r>.json`` in the instance directory: who this rank is (pid, ranks, the experts it
  holds), read by the front end's ``/resilience/status``, rewritten when its view changes.

A step that lost a peer is run again (``patches/scheduler_failover.py``, with
:func:`resync`): every collective of one step runs in one generation of the group,
so a survivor that sees a membership change mid-step runs the same batch again from the
batch-size sync, now among the live ranks; what the failed attempt wrote (the KV of the
step's own positions) is written again, nothing is preempted or re-prefilled.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from ..common.instance import instance_dir
from . import experts, groups
from .instance import current

__all__ = ["on_model_loaded", "rank_file", "write_rank_file", "resync", "MAX_RERUNS"]

log = logging.getLogger(__name__)

MAX_RERUNS = 8
"""Re-runs of one step before giving up (each needs one more rank lost during the step)."""

_state: dict[str, Any] = {}


def rank_file(instance: str, rank: int) -> str:
    return os.path.join(instance_dir(instance), f"rank-{rank}.json")


def write_rank_file() -> None:
    """This rank's identity and counters, for ``/resilience/status`` (atomic rename)."""
    if not _state:
        return
    cfg, instance = current()
    amap = experts.current()
    g = groups.current_group()
    from . import kv

    ckpt = kv.current()
    info = {**_state["identity"], "kv": ckpt.status() if ckpt is not None else None,
            "local_experts": amap.local_experts(_state["identity"]["rank"]) if amap else [],
            "active_experts": amap.status()["active"] if amap else [],
            "dead": sorted(g.dead) if g else [], "epoch": g.epoch if g else 0,
            "counters": dict(groups.COUNTERS), "time": time.time()}
    path = rank_file(instance, _state["identity"]["rank"])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def _mask_active_ranks(dead) -> None:
    from sglang.srt.runtime_context import get_parallel

    for gc in {id(g): g for g in (get_parallel().tp_group, get_parallel().world_group)}.values():
        for name in ("active_ranks", "active_ranks_cpu"):
            t = getattr(gc, name, None)
            if t is not None:
                for r in dead:
                    if r < t.shape[0]:
                        t[r] = 0


def on_model_loaded(model_runner: Any) -> None:
    """Set this scheduler's failover side up (idempotent; skips draft workers)."""
    if _state or getattr(model_runner, "is_draft_worker", False):
        return
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata
    from sglang.srt.runtime_context import get_parallel

    cfg, instance = current()
    p = get_parallel()
    rank, size = int(p.tp_rank), int(p.tp_size)
    metadata = get_global_expert_location_metadata()
    if metadata is None:
        raise RuntimeError("resilient-ep: SGLang built no expert location metadata; the "
                           "failover path needs the core's placement (see docs/sglang.md)")
    amap = experts.install(metadata, size, cfg)
    _state["identity"] = {"rank": rank, "pid": os.getpid(), "tp_rank": rank,
                          "dp_rank": int(p.attn_dp_rank), "ep_rank": int(p.moe_ep_rank),
                          "num_local_experts": len(amap.local_experts(rank)),
                          "num_experts": int(metadata.num_logical_experts),
                          "num_layers": int(metadata.num_layers)}

    def on_change(dead, epoch) -> None:
        _mask_active_ranks(dead)
        amap.set_dead(dead)
        try:
            write_rank_file()
        except OSError:
            log.exception("resilient-ep: rank file not written")

    groups.add_listener(on_change)
    groups.group(rank, size)
    from .kv import serve_peer_store

    serve_peer_store(cfg, instance, rank, size)
    write_rank_file()
    log.info("resilient-ep: scheduler rank %d of %d ready for failover (holds experts %s, "
             "computes %s)", rank, size, amap.local_experts(rank),
             [e for e, s in enumerate(amap.active().tolist()) if s // amap.plan.slots_per_rank
              == rank])


def resync(scheduler: Any, batch: Any) -> None:
    """The batch-size sync for ``batch`` again, among the live ranks (retried on a loss)."""
    scheduler.dp_attn_adapter.prepare_mlp_sync_batch(batch)
