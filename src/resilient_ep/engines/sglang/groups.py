"""The failover group of one SGLang scheduler: a :class:`~resilient_ep.transport.group.LiveGroup`
among the instance's scheduler processes (one per attention-DP / EP rank), carrying every
collective SGLang runs over its TP group while it serves (``patches/tp_collectives.py``):
the per-step batch-size sync of DP attention, the token gather before each MoE layer and
the reduce-scatter after it.

It reads this process's replica of the instance's membership (the front end's
:class:`~resilient_ep.liveness.LivenessMonitor` publishes it; ``frontend.py``) and reports
what it finds out itself (a peer that dropped or went silent during a collective) to that
authority (:class:`~resilient_ep.liveness.LossReporter`), which fences the rank. Each
scheduler also sends the authority a beacon (:class:`~resilient_ep.liveness.Beacon`), so a
frozen scheduler is found even while nobody waits on it in a collective.

On every change of the dead set, in the thread that applies it and before any collective of
the new generation runs, the listeners rewrite this scheduler's view: SGLang's
``tp_group.active_ranks`` masks (its own elastic-EP mechanism: a masked rank's row of the
batch-size sync reads as idle) and the expert tables (``experts.ActiveMap``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from resilient_ep.liveness import Beacon, LossReporter
from resilient_ep.transport.group import LiveGroup

from ..common.replica import replica
from .instance import beacon_endpoint, current, group_endpoints, membership_endpoint

__all__ = ["group", "current_group", "add_listener", "COUNTERS"]

log = logging.getLogger(__name__)

_group: LiveGroup | None = None
_beacon: Beacon | None = None
_listeners: list[Callable] = []
_lock = threading.Lock()

COUNTERS = {"step_reruns": 0, "sync_reruns": 0, "idle_skips": 0, "rerun_s": 0.0}
"""This scheduler's failover counts (read by the status endpoint through its rank file)."""


def current_group() -> LiveGroup | None:
    return _group


def group(rank: int, size: int) -> LiveGroup:
    """This scheduler's group (made on first use)."""
    global _group, _beacon
    with _lock:
        if _group is not None:
            return _group
        settings = current()
        if settings is None:
            raise RuntimeError("resilient-ep: no SGLang instance settings in this process")
        cfg, instance = settings
        rep = replica(membership_endpoint(instance), size)
        g = LiveGroup("sglang-tp", rank, group_endpoints(instance, size), detector=cfg.detector,
                      membership=rep.membership, membership_replica=True)
        g.add_listener(LossReporter(beacon_endpoint(instance), rank, known_dead=g.dead))
        for fn in _listeners:
            g.add_listener(fn)

        def on_loss(loss) -> None:  # the authority's decision wakes a collective blocked on it
            g.configure(loss.epoch, rep.membership.view().live_ranks)

        rep.on_loss(on_loss)
        _beacon = Beacon(beacon_endpoint(instance), rank, cfg.detector.heartbeat_interval_ms / 1e3)
        _group = g
        log.info("resilient-ep: scheduler failover group up (rank %d of %d)", rank, size)
        return g


def add_listener(fn: Callable) -> None:
    """``fn(dead, epoch)`` on every change of this scheduler's group."""
    with _lock:
        _listeners.append(fn)
        if _group is not None:
            _group.add_listener(fn)
