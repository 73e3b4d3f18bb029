"""The failover groups of one vLLM instance: one :class:`~resilient_ep.transport.group.LiveGroup`
per process, among the data-parallel ranks.

- ``worker`` group (in each worker, one group per TP rank): the per-forward collectives that
  vLLM runs over gloo on the DP group (token counts, MoE all-gather / reduce-scatter). Strict:
  a lost member fails the forward pass on every survivor, which runs it again.
- ``core`` group (in each engine-core process): the "anyone still busy?" sum of the DP busy
  loop. Lenient: it completes over the live engines and never fails.

Endpoints are Unix sockets in the instance's directory (``instance.py``).

Each group reads this process's replica of the instance's membership
(``liveness.membership_replica``: kept equal to the authority's, the liveness monitor of the
process that started the engine cores, epochs included). What a
group finds out itself (a peer that dropped during a collective) it acts on at once and
reports to the authority, which fences the rank and publishes the loss; the group's epoch is
always one the authority decided.
"""

from __future__ import annotations

import logging
from typing import Any

from resilient_ep.liveness import LossReporter
from resilient_ep.transport.group import LiveGroup

from .instance import endpoints, instance_of
from .liveness import beacon_endpoint, membership_replica

__all__ = ["worker_group", "core_group", "current_worker_group", "current_core_group"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler

_worker: LiveGroup | None = None
_core: LiveGroup | None = None


def worker_group(vllm_config: Any, dp_rank: int, dp_size: int, tp_rank: int) -> LiveGroup:
    """This worker's group (created on first use)."""
    global _worker
    if _worker is None:
        cfg, instance = instance_of(vllm_config)
        replica = membership_replica(instance, dp_size)
        _worker = LiveGroup(f"workers-tp{tp_rank}", dp_rank,
                            endpoints(instance, f"w{tp_rank}", dp_size), detector=cfg.detector,
                            tied_to_parent=_worker_has_engine_parent(vllm_config),
                            membership=replica.membership, membership_replica=True)
        # The instance's liveness monitor owns its membership: it hears of every loss a
        # worker group sees (a frozen worker whose engine core still beacons, a killed worker
        # whose engine core has not exited yet) and fences that rank.
        _worker.add_listener(LossReporter(beacon_endpoint(instance), dp_rank))
        _follow_authority(_worker, replica)
        log.info("resilient-ep: worker failover group up (dp rank %d of %d)", dp_rank, dp_size)
    return _worker


def _worker_has_engine_parent(vllm_config: Any) -> bool:
    # The multiprocessing executor starts workers as children of the engine core; the "uni"
    # executor runs the worker inside it.
    return vllm_config.parallel_config.distributed_executor_backend != "uni"


def current_worker_group() -> LiveGroup | None:
    return _worker


def current_core_group() -> LiveGroup | None:
    return _core


def core_group(vllm_config: Any) -> LiveGroup:
    global _core
    if _core is None:
        pc = vllm_config.parallel_config
        cfg, instance = instance_of(vllm_config)
        size = int(pc.data_parallel_size)
        replica = membership_replica(instance, size)
        _core = LiveGroup("engine-cores", int(pc.data_parallel_rank),
                          endpoints(instance, "core", size), detector=cfg.detector,
                          membership=replica.membership, membership_replica=True)
        _follow_authority(_core, replica)
    return _core


def _follow_authority(group: LiveGroup, replica) -> None:
    """Each loss the replica learns also wakes a collective of ``group`` blocked on the lost
    rank (``configure`` with the authority's view)."""
    replica.on_loss(lambda loss: group.configure(loss.epoch,
                                                 replica.membership.view().live_ranks))
