"""Ledger entry ``vllm-cpu-resilient-all2all`` (patches/vllm-cpu-resilient-all2all.md).

Why: ``CpuCommunicator.__init__`` always installs ``AgRsAll2AllManager`` (gloo all-gather /
reduce-scatter over the DP group) for the expert-parallel group, whatever
``--all2all-backend`` says; there is no hook to choose another manager. Gloo collectives raise
or hang when a DP rank dies.

How: after the original ``__init__``, when resilience is on with DP > 1 and EP, replace the
manager by :class:`~resilient_ep.engines.vllm.all2all.ResilientAll2AllManager` (same
algorithm over the worker failover group) and subscribe the expert maps
(:mod:`..experts`) to that group's membership.
"""

from __future__ import annotations

import functools

from . import check_version, expect_overrides, expect_signature, is_marked, mark

NAME = "vllm-cpu-resilient-all2all"
TARGET_MODULE = "vllm.distributed.device_communicators.cpu_communicator"
_PARAMS = ("self", "cpu_group", "device", "device_group", "unique_name", "use_all2all")


def _target():
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    return CpuCommunicator


# What ResilientAll2AllManager (all2all.py) overrides or relies on in AgRsAll2AllManager.
OVERRIDES = {
    "__init__": ("self", "cpu_group", "tcp_store_group"),
    "dispatch_router_logits": ("self", "hidden_states", "router_logits", "is_sequence_parallel",
                               "extra_tensors"),
    "dispatch": ("self", "hidden_states", "topk_weights", "topk_ids", "is_sequence_parallel",
                 "extra_tensors"),
    "combine": ("self", "hidden_states", "is_sequence_parallel"),
    "allocate_combine_input": ("self", "shape", "dtype", "device", "is_sequence_parallel"),
    "combine_into_output": ("self", "hidden_states", "output", "is_sequence_parallel"),
    "_get_sizes": ("self", "num_local_tokens", "comm_group"),
    "_get_comm_group": ("self", "is_sequence_parallel"),
}


def check() -> None:
    check_version(NAME)
    expect_signature(NAME, _target().__init__, _PARAMS)
    from vllm.distributed.device_communicators.all2all import AgRsAll2AllManager

    expect_overrides(NAME, AgRsAll2AllManager, OVERRIDES)


def is_applied() -> bool:
    return is_marked(_target().__dict__.get("__init__"), NAME)


def install_manager(comm) -> bool:
    """Swap ``comm``'s all2all manager for the resilient one when failover applies."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_dp_group, get_tp_group

    from .. import experts
    from ..all2all import ResilientAll2AllManager
    from ..groups import add_join_preparer, add_worker_listener, worker_group
    from ..instance import failover_enabled

    if comm.all2all_manager is None:
        return False
    cfg = get_current_vllm_config()
    if not failover_enabled(cfg):
        return False
    dp = get_dp_group()
    if dp.world_size < 2:
        return False
    tp = get_tp_group()
    group = worker_group(cfg, dp.rank_in_group, dp.world_size, tp.rank_in_group)
    tp_size = tp.world_size

    def on_change(dead, epoch, tp_size=tp_size):
        experts.set_dead_ranks({d * tp_size + t for d in dead for t in range(tp_size)})

    def on_join(join, tp_size=tp_size):  # heard some steps before the switch
        experts.prepare_joined({int(join.rank) * tp_size + t for t in range(tp_size)})

    add_worker_listener(on_change)
    add_join_preparer("worker", on_join)
    comm.all2all_manager = ResilientAll2AllManager(comm.cpu_group, group)
    return True


def apply() -> None:
    cls = _target()
    original = cls.__dict__["__init__"]
    if is_marked(original, NAME):
        return

    @functools.wraps(original)
    def __init__(self, cpu_group, device=None, device_group=None, unique_name="",
                 use_all2all=False):
        original(self, cpu_group, device, device_group, unique_name, use_all2all)
        install_manager(self)

    cls.__init__ = mark(__init__, NAME, original)
