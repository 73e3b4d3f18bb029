"""Ledger entry ``sglang-cpu-moe-native-ep`` (patches/sglang-cpu-moe-native-ep.md).

Why: with expert parallelism (``--ep-size`` > 1) SGLang's dispatcher maps each token's global
expert ids to this rank's local ids and writes -1 for the experts other ranks hold
(``StandardDispatcher.dispatch``: -1 is the "not here" sentinel). On the CPU without the
Intel AMX kernels, ``UnquantizedFusedMoEMethod.forward_cpu`` runs
``fused_moe_native.moe_forward_native``, which counts tokens per expert with ``scatter_`` on
those ids and fails: ``index -1 is out of bounds for dimension 1``.

How: an AROUND hook (SGLang's ``HookRegistry``) on ``moe_forward_native``: the tokens with at
least one local expert go to the original, each non-local choice pointed at a local expert
that token does not use otherwise (the original counts tokens per expert with ``scatter_``,
which counts a repeated id once) and weighted 0 (its term is an exact +0.0); tokens with no
local expert get a zero row (the other ranks' partial outputs are summed in by the combine).
Without any -1 id the original runs untouched.
"""

from __future__ import annotations

import torch

from . import check_version, expect_signature, hook, hooked

NAME = "sglang-cpu-moe-native-ep"
TARGET_MODULE = "sglang.srt.layers.moe.fused_moe_native"
TARGET = f"{TARGET_MODULE}.moe_forward_native"
_PARAMS = ("layer", "x", "topk_output", "moe_runner_config")


def _original():
    import sglang.srt.layers.moe.fused_moe_native as m

    fn = m.moe_forward_native
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def check() -> None:
    check_version(NAME)
    expect_signature(NAME, _original(), _PARAMS)


def is_applied() -> bool:
    return hooked(TARGET, local_experts_only)


def local_experts_only(original, layer, x, topk_output, moe_runner_config):
    """``moe_forward_native`` over the tokens that have a local expert (-1 ids skipped)."""
    topk_weights, topk_ids = topk_output[0], topk_output[1]
    local = topk_ids >= 0  # [T, k]
    if bool(local.all()):
        return original(layer, x, topk_output, moe_runner_config)
    rows = local.any(dim=1)  # [T] tokens with at least one expert here
    out = x.new_zeros(x.shape[0], x.shape[1])
    if bool(rows.any()):
        keep = local[rows]
        ids = fill_unused(topk_ids[rows], keep, int(layer.w13_weight.shape[0]))
        weights = torch.where(keep, topk_weights[rows], torch.zeros_like(topk_weights[rows]))
        sub = topk_output._replace(topk_weights=weights, topk_ids=ids)
        out[rows] = original(layer, x[rows], sub, moe_runner_config).to(out.dtype)
    return out


def fill_unused(ids: torch.Tensor, keep: torch.Tensor, num_local: int) -> torch.Tensor:
    """``ids [T, k]`` with every position not in ``keep`` replaced by a local expert id
    (< ``num_local``) that its row does not use, so no row repeats an id."""
    T, k = ids.shape
    if num_local < k:
        raise ValueError(f"{NAME}: {num_local} local experts cannot stand in for {k} choices "
                         f"of a token; see patches/{NAME}.md")
    out = torch.where(keep, ids, torch.zeros_like(ids))
    # [T, num_local + 1]: the last column collects the positions to fill (ignored)
    used = torch.zeros(T, num_local + 1, dtype=torch.bool, device=ids.device)
    used.scatter_(1, torch.where(keep, ids, num_local).to(torch.int64), True)
    used = used[:, :num_local].clone()
    for j in range(k):
        free = (~used).to(torch.int8).argmax(dim=1)  # [T] the first id the row does not use
        fill = ~keep[:, j]
        out[:, j] = torch.where(fill, free.to(out.dtype), out[:, j])
        used[torch.arange(T, device=ids.device)[fill], free[fill]] = True
    return out


def apply() -> None:
    hook(NAME, TARGET, local_experts_only, "AROUND")
