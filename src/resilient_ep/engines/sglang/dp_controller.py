"""The DP controller of a failover-enabled SGLang instance follows the membership: no request,
health check or control message goes to a lost rank (``patches/dp_controller_failover.py``).

The controller keeps a replica of the instance's membership (``MembershipReplica``); on each
loss it takes the rank out of SGLang's own worker status (``status``, ``_active_workers``:
what its round robin, health checks and control fan-out read). A request the front end routed
to a rank that turns out dead (a race with the detection) is dropped here: the front end
re-admits every request it had on that rank. A send to a rank that died but is not known dead
yet would block for ever (a ZeroMQ PUSH socket without a peer), so sends to the workers time
out (``SEND_TIMEOUT_MS``) and are retried until they land or the rank is known dead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..common.replica import replica
from .instance import current, membership_endpoint

__all__ = ["attach", "send", "is_dead", "SEND_TIMEOUT_MS"]

log = logging.getLogger(__name__)

SEND_TIMEOUT_MS = 200
_dead: set[int] = set()
_attached: dict[str, Any] = {}


def is_dead(rank: int) -> bool:
    return rank in _dead


def attach(controller: Any, size: int) -> None:
    """Follow the membership in this DP controller process (once)."""
    if _attached:
        return
    import zmq

    _, instance = current()
    rep = replica(membership_endpoint(instance), size)
    for sock in controller.workers:
        if sock is not None:
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)

    def on_loss(loss) -> None:
        _dead.add(int(loss.rank))
        status = list(controller.status)
        if loss.rank < len(status):
            status[loss.rank] = False
        controller.status = status
        controller._active_workers = [i for i in controller._active_workers if i not in _dead]
        controller._active_count_cache = len(controller._active_workers)
        log.warning("resilient-ep: DP controller: rank %d lost, routing to %s", loss.rank,
                    controller._active_workers)

    rep.on_loss(on_loss)
    _attached["controller"] = controller
    _attached["replica"] = rep


def send(controller: Any, rank: int, obj: Any) -> bool:
    """Send ``obj`` to worker ``rank``; False when the rank is (or turns out) dead."""
    import zmq
    from sglang.srt.managers.io_struct import sock_send

    while rank not in _dead:
        try:
            sock_send(controller.workers[rank], obj)
            return True
        except zmq.Again:
            time.sleep(0.01)  # no peer: dead and not known yet, or its queue is full
    log.warning("resilient-ep: DP controller: dropped %s for lost rank %d (the front end "
                "re-admits its requests)", type(obj).__name__, rank)
    return False
