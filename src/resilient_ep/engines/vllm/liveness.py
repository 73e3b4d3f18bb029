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

from resilient_ep.liveness import LivenessMonitor, RankLoss
from resilient_ep.membership import Membership

from ..common.replica import MembershipReplica, replica
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


def membership_replica(instance: str, size: int) -> MembershipReplica:
    """The one replica of ``instance``'s membership in this process (made on first use)."""
    return replica(membership_endpoint(instance), size)
