"""Ledger entry ``vllm-expert-replicas`` (patches/vllm-expert-replicas.md).

Why: with ``--enable-expert-parallel`` every expert lives on exactly one rank
(``determine_expert_map``), so a dead rank takes its experts with it. vLLM's redundant
experts come only with EPLB, which its config validation refuses off CUDA/ROCm/XPU, and which
places replicas for load, not for surviving a rank.

How (resilience on, DP > 1, EP, linear placement, no fused shared experts): the core's
placement (:class:`..experts.ExpertPlan`: ``placement.redundant_slots_per_rank`` replicas
placed for survival, plus shadow slots) decides what each rank holds:
``determine_expert_map`` returns the *held* map (the weight loader fills every held slot);
``RoutedExperts.update_expert_map_info`` then gives the layer a separate *active* map tensor
(each expert served by one live rank), registered with :mod:`..experts`, which rewrites it in
place when a rank dies or a repair lands. ``process_weights_after_loading`` (the model
loader's last step) is followed by :func:`..experts.after_load` (host backup, disk-source
check). Refuses ``--enable-ep-weight-filter``.

A replacement rank (a rejoin) loads its experts from the survivors' memory or the node's host
backup instead of the model files: ``DefaultModelLoader._init_ep_weight_filter`` is followed by
:func:`..experts.skip_disk_experts`, which, when every expert the rank holds has such a
source, sets the loader's ``local_expert_ids`` to the empty set (vLLM's own EP weight filter:
every expert tensor is skipped before it is read); ``after_load`` then fills the slots.
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


def _loader():
    import vllm.model_executor.model_loader.base_loader as base_loader

    return base_loader


def _default_loader():
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    return DefaultModelLoader


def check() -> None:
    check_version(NAME)
    emm, routed = _targets()
    expect_signature(NAME, emm.determine_expert_map, _MAP_PARAMS)
    expect_signature(NAME, routed.update_expert_map_info, ("self",))
    loader = _loader()
    expect_signature(NAME, loader.process_weights_after_loading,
                     ("model", "model_config", "target_device"))
    default = _default_loader()
    expect_signature(NAME, default._init_ep_weight_filter, ("self", "model_config"))
    if "local_expert_ids" not in default.__init__.__code__.co_names:
        raise RuntimeError(f"{NAME}: DefaultModelLoader no longer keeps local_expert_ids")


def is_applied() -> bool:
    emm, _ = _targets()
    return is_marked(emm.determine_expert_map, NAME)


def _wanted() -> bool:
    return _state(None, None, None, probe=True) is not None


def _state(num_experts, ep_size, ep_rank, *, probe: bool = False):
    """This process's expert state (None when failover does not apply); ``probe``: only ask."""
    from vllm.config import get_current_vllm_config

    from .. import experts
    from ..instance import failover_enabled, instance_of

    try:
        cfg = get_current_vllm_config()
        wanted = failover_enabled(cfg)
    except Exception:
        return None
    if not wanted:
        return None
    if getattr(cfg.parallel_config, "enable_ep_weight_filter", False):
        # The filter makes the loader skip every expert vLLM's own placement does not give
        # this rank: the replica slots would stay empty (random weights, wrong outputs).
        raise ValueError("--enable-ep-weight-filter cannot be combined with "
                         "--enable-resilience: the resilience replicas load every expert "
                         "this rank holds a copy of")
    if probe:
        return True
    rcfg, instance = instance_of(cfg)
    raw = cfg.additional_config.get("resilience") or {}
    return experts.state_for(num_experts, ep_size, ep_rank, config=rcfg,
                             shadow_slots=int(raw.get("shadow_slots") or 0), instance=instance,
                             model_dir=str(cfg.model_config.model))


def apply() -> None:
    from .. import experts

    emm, routed = _targets()
    orig_map = emm.determine_expert_map
    if is_marked(orig_map, NAME):
        return
    orig_info = routed.__dict__["update_expert_map_info"]
    loader = _loader()
    orig_post = loader.process_weights_after_loading

    @functools.wraps(orig_map)
    def determine_expert_map(ep_size, ep_rank, global_num_experts,
                             expert_placement_strategy="linear", num_fused_shared_experts=0,
                             return_expert_mask=False):
        if (ep_size > 1 and expert_placement_strategy == "linear"
                and not num_fused_shared_experts and not return_expert_mask and _wanted()):
            state = _state(global_num_experts, ep_size, ep_rank)
            return state.plan.slots_per_rank, state.plan.held_map(ep_rank), None
        return orig_map(ep_size, ep_rank, global_num_experts, expert_placement_strategy,
                        num_fused_shared_experts, return_expert_mask)

    @functools.wraps(orig_info)
    def update_expert_map_info(self):
        orig_info(self)
        manager = self.expert_map_manager
        held = manager.expert_map
        if held is None or manager.ep_size < 2 or not _wanted():
            return
        state = _state(manager.global_num_experts, manager.ep_size, manager.ep_rank)
        if manager.local_num_experts != state.plan.slots_per_rank:
            return  # not our placement (e.g. round robin): leave vLLM's map alone
        active = held.clone()
        self.register_buffer("_expert_map", active, persistent=False)
        state.register(self, active, str(getattr(self, "layer_name", "")))

    @functools.wraps(orig_post)
    def process_weights_after_loading(model, model_config, target_device):
        orig_post(model, model_config, target_device)
        experts.after_load(model)

    default = _default_loader()
    orig_filter = default.__dict__["_init_ep_weight_filter"]

    @functools.wraps(orig_filter)
    def _init_ep_weight_filter(self, model_config):
        orig_filter(self, model_config)
        if experts.skip_disk_experts():
            self.local_expert_ids = set()  # every expert tensor skipped before it is read

    emm.determine_expert_map = mark(determine_expert_map, NAME, orig_map)
    default._init_ep_weight_filter = mark(_init_ep_weight_filter, NAME, orig_filter)
    routed.update_expert_map_info = mark(update_expert_map_info, NAME, orig_info)
    loader.process_weights_after_loading = mark(process_weights_after_loading, NAME, orig_post)
