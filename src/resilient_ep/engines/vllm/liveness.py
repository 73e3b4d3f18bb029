"""One membership authority per vLLM instance, from the core's
:class:`~resilient_ep.liveness.LivenessMonitor`.

Where the engine ranks are watched depends on how many API servers vLLM runs:
- one API server (``--api-server-count 1``): that process starts the engine cores, and its
  engine client (``frontend.py``) runs the monitor;
- several (vLLM's default for DP): the ``vllm serve`` launcher process starts the engine
  cores and runs the monitor (``patches/engine_manager_failover.py``); each API server's
  engine client follows it, so every API server sees the same epochs and re-admits its own
  requests.

Either way the monitor publishes every loss on ``ipc://<instance dir>/membership``, and every
other process of the instance that needs the membership (the API servers, the engine cores'
and the workers' failover groups, ``groups.py``) keeps a replica of it with a
:class:`~resilient_ep.liveness.MembershipSubscriber`: one epoch everywhere.

Either way the monitor hears the engine cores' beacons and the worker groups' loss reports on
``ipc://<instance dir>/beacons-0`` and fences a lost rank whole (``fencing.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from resilient_ep.liveness import LivenessMonitor, MembershipSubscriber, RankLoss
from resilient_ep.membership import Membership

from .fencing import RankProcesses
from .instance import endpoints, instance_dir, instance_of, join_instance
from .multinode import monitor_across_nodes

__all__ = ["beacon_endpoint", "membership_endpoint", "start_monitor", "MembershipReplica",
           "membership_replica"]


def beacon_endpoint(instance: str) -> str:
    return endpoints(instance, "beacons", 1)[0]


def membership_endpoint(instance: str) -> str:
    from . import multinode

    root = join_instance(instance)
    return (multinode.endpoints(instance, "membership", 1) or [f"ipc://{root}/membership"])[0]


def start_monitor(vllm_config, procs: list, *,
                  membership: Membership | None = None) -> tuple[LivenessMonitor, RankProcesses]:
    """Watch the engine-core processes ``procs`` of a failover-enabled instance."""
    cfg, instance = instance_of(vllm_config)
    ranks = RankProcesses(procs)
    size = int(vllm_config.parallel_config.data_parallel_size)
    monitor = LivenessMonitor(
        membership or Membership(size), ranks.by_rank, detector=cfg.detector,
        beacon_endpoint=beacon_endpoint(instance),
        publish_endpoint=membership_endpoint(instance),
        fence=ranks.fence, tick=ranks.census, name="vllm-liveness",
        **monitor_across_nodes(instance, ranks.by_rank, size))

    def reap(loss: RankLoss) -> None:
        ranks.reap(loss.rank)

    monitor.add_listener(reap)
    # This process outlives the instance's others: it removes the instance's directory
    # (sockets, key) when it exits.
    import atexit
    import shutil

    atexit.register(shutil.rmtree, instance_dir(instance), ignore_errors=True)
    from resilient_ep.repair.host_backup import default_root

    atexit.register(shutil.rmtree, default_root(instance).parent, ignore_errors=True)
    return monitor, ranks


class MembershipReplica:
    """This process's replica of the instance's membership: a
    :class:`~resilient_ep.membership.Membership` kept equal to the authority's (epochs
    included) by one :class:`~resilient_ep.liveness.MembershipSubscriber`, shared by every
    part of the process that needs it (failover groups, the KV connector, a join).
    ``on_loss(fn)`` / ``on_join(fn)`` callbacks run in the subscriber's thread, after the
    replica has the event; ``events()`` is the authority's log as applied so far."""

    def __init__(self, instance: str, size: int):
        self.membership = Membership(size)
        self._listeners: list[Callable[[RankLoss], None]] = []
        self._join_listeners: list[Callable] = []
        self._subscriber = MembershipSubscriber(membership_endpoint(instance), self.membership,
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


def membership_replica(instance: str, size: int) -> MembershipReplica:
    """The one replica of ``instance``'s membership in this process (made on first use)."""
    with _replicas_lock:
        rep = _replicas.get(instance)
        if rep is None:
            rep = _replicas[instance] = MembershipReplica(instance, size)
        if rep.membership.num_ranks != size:
            raise ValueError(f"instance {instance} has {rep.membership.num_ranks} ranks, "
                             f"not {size}")
        return rep
