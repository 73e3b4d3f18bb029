"""Ledger entry ``vllm-expert-replicas`` (patches/vllm-expert-replicas.md).

Why: with ``--enable-expert-parallel`` every expert lives on exactly one rank
(``determine_expert_map``), so a dead rank takes its experts with it. vLLM's redundant
experts come only with EPLB, which its config validation refuses off CUDA/ROCm/XPU, and which
places replicas for load, not for surviving a rank.

How (resilience on, DP > 1, EP, linear placement, no fused shared experts): each rank holds
its own block of experts and the next rank's (``replicas.RingReplicas``):
``determine_expert_map`` returns the *held* map (the weight loader fills every held slot);
``RoutedExperts.update_expert_map_info`` then gives the layer a separate *active* map tensor
(vLLM's own assignment while all ranks live), registered with :mod:`..replicas`, which
rewrites it in place when a rank dies. Costs one extra block of expert weights per rank.
Falls back to vLLM's placement (no replicas: a dead rank leaves its experts uncovered) when
the expert count is not a multiple of the EP size; refuses ``--enable-ep-weight-filter``.
"""

from __future__ import annotations

import functools

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-expert-replicas"
TARGET_MODULE = "vllm.model_executor.layers.fused_moe.routed_experts"
_MAP_PARAMS = ("ep_size", "ep_rank", "global_num_experts", "expert_placement_strategy",
               "num_fused_shared_experts", "return_expert_mask")


def _targets():
    import vllm.model_executor.layers.fused_moe.expert_map_manager as emm
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return emm, RoutedExperts


def check() -> None:
    check_version(NAME)
    emm, routed = _targets()
    expect_signature(NAME, emm.determine_expert_map, _MAP_PARAMS)
    expect_signature(NAME, routed.update_expert_map_info, ("self",))


def is_applied() -> bool:
    emm, _ = _targets()
    return is_marked(emm.determine_expert_map, NAME)


def _wanted() -> bool:
    from vllm.config import get_current_vllm_config

    from ..instance import failover_enabled

    try:
        cfg = get_current_vllm_config()
        wanted = failover_enabled(cfg)
    except Exception:
        return False
    if wanted and getattr(cfg.parallel_config, "enable_ep_weight_filter", False):
        # The filter makes the loader skip every expert vLLM's own placement does not give
        # this rank: the replica block would stay empty (random weights, wrong outputs).
        raise ValueError("--enable-ep-weight-filter cannot be combined with "
                         "--enable-resilience: the resilience replicas load every expert "
                         "this rank holds a copy of")
    return wanted


def apply() -> None:
    from .. import replicas

    emm, routed = _targets()
    orig_map = emm.determine_expert_map
    if is_marked(orig_map, NAME):
        return
    orig_info = routed.__dict__["update_expert_map_info"]

    @functools.wraps(orig_map)
    def determine_expert_map(ep_size, ep_rank, global_num_experts,
                             expert_placement_strategy="linear", num_fused_shared_experts=0,
                             return_expert_mask=False):
        if (ep_size > 1 and expert_placement_strategy == "linear"
                and global_num_experts % ep_size == 0
                and not num_fused_shared_experts and not return_expert_mask and _wanted()):
            ring = replicas.RingReplicas(global_num_experts, ep_size)
            return ring.local_count(), ring.held_map(ep_rank), None
        return orig_map(ep_size, ep_rank, global_num_experts, expert_placement_strategy,
                        num_fused_shared_experts, return_expert_mask)

    @functools.wraps(orig_info)
    def update_expert_map_info(self):
        orig_info(self)
        manager = self.expert_map_manager
        held = manager.expert_map
        if held is None or manager.ep_size < 2 or not _wanted():
            return
        ring = replicas.RingReplicas(manager.global_num_experts, manager.ep_size)
        if manager.local_num_experts != ring.local_count():
            return  # not our placement (e.g. round robin): leave vLLM's map alone
        active = held.clone()
        self.register_buffer("_expert_map", active, persistent=False)
        replicas.register_active_map(active, ring, manager.ep_rank)

    emm.determine_expert_map = mark(determine_expert_map, NAME, orig_map)
    routed.update_expert_map_info = mark(update_expert_map_info, NAME, orig_info)
