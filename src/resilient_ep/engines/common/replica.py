"""One replica of an instance's membership per process, shared by every part of the process
that needs it (failover groups, front ends, a join), fed by one
:class:`~resilient_ep.liveness.MembershipSubscriber` from the instance's membership authority
(the :class:`~resilient_ep.liveness.LivenessMonitor` of the process that started the ranks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from resilient_ep.liveness import MembershipSubscriber, RankLoss
from resilient_ep.membership import Membership

__all__ = ["MembershipReplica", "replica"]


class MembershipReplica:
    """This process's replica of the instance's membership: a
    :class:`~resilient_ep.membership.Membership` kept equal to the authority's (epochs
    included) by one :class:`~resilient_ep.liveness.MembershipSubscriber`, shared by every
    part of the process that needs it (failover groups, the KV connector, a join).
    ``on_loss(fn)`` / ``on_join(fn)`` callbacks run in the subscriber's thread, after the
    replica has the event; ``events()`` is the authority's log as applied so far."""

    def __init__(self, endpoint: str, size: int):
        self.membership = Membership(size)
        self._listeners: list[Callable[[RankLoss], None]] = []
        self._join_listeners: list[Callable] = []
        self._subscriber = MembershipSubscriber(endpoint, self.membership,
                                                self._on_loss, on_join=self._on_join).start()

    def on_loss(self, fn: Callable[[RankLoss], None]) -> None:
        self._listeners.append(fn)

    def on_join(self, fn: Callable) -> None:
        self._join_listeners.append(fn)

    def events(self) -> list:
        return list(self._subscriber.events)

    def _on_loss(self, loss: RankLoss) -> None:
        for fn in list(self._listeners):
            fn(loss)

    def _on_join(self, join) -> None:
        for fn in list(self._join_listeners):
            fn(join)


_replicas: dict[str, MembershipReplica] = {}
_replicas_lock = threading.Lock()


def replica(endpoint: str, size: int) -> MembershipReplica:
    """The one replica of the membership published on ``endpoint`` in this process (made on
    first use)."""
    with _replicas_lock:
        rep = _replicas.get(endpoint)
        if rep is None:
            rep = _replicas[endpoint] = MembershipReplica(endpoint, size)
        if rep.membership.num_ranks != size:
            raise ValueError(f"the membership on {endpoint} has {rep.membership.num_ranks} "
                             f"ranks, not {size}")
        return rep
