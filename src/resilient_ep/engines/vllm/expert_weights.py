"""One expert's weights in vLLM's MoE layers: the per-slot tensors of a ``RoutedExperts``,
copying an expert into a slot in place, and reading an expert from the model's safetensors
in the runtime format (the disk repair source)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from resilient_ep.repair.staging import copy_weights

__all__ = ["slot_params", "copy_slot", "disk_expert"]


def slot_params(module: Any):
    """The module's per-expert tensors: parameters whose first dim is the local slot count."""
    n = int(module.local_num_experts)
    for name, p in module.named_parameters(recurse=False):
        if p.dim() >= 1 and p.shape[0] == n:
            yield name, p


def copy_slot(module: Any, tensors: dict[str, torch.Tensor], local_slot: int) -> int:
    total = 0
    params = dict(slot_params(module))
    missing = set(params) - set(tensors)
    if missing:
        raise KeyError(f"no tensor for {sorted(missing)}")
    for name, p in params.items():
        src = tensors[name]
        if tuple(src.shape) != tuple(p.shape[1:]) or src.dtype != p.dtype:
            raise ValueError(f"{name}: {tuple(src.shape)} {src.dtype} does not fit a slot of "
                             f"{tuple(p.shape[1:])} {p.dtype}")
    for name, p in params.items():
        copy_weights(p.data[local_slot], tensors[name])
        total += tensors[name].numel() * tensors[name].element_size()
    return total


def disk_expert(module: Any, model_dir: str | None, expert: int) -> dict[str, torch.Tensor]:
    """``expert``'s weights for ``module`` read from the model's safetensors and put in the
    runtime format the way vLLM's loader and kernel set-up do for an unquantized layer at
    TP=1 (gate and up stacked into ``w13``, then the kernel's own post-load step on a
    one-expert scratch module). :meth:`ExpertState.after_load` checks it bitwise against a
    loaded slot and turns the source off where it differs."""
    if not model_dir:
        raise FileNotFoundError("the model directory is unknown")
    tp = getattr(getattr(module.moe_config, "moe_parallel_config", None), "tp_size", 1)
    if tp != 1 or getattr(module, "quant_config", None) is not None:
        raise NotImplementedError("disk repair covers unquantized experts at TP=1")
    prefix = module.layer_name
    names = {"gate": module.ckpt_gate_proj_name, "down": module.ckpt_down_proj_name,
             "up": module.ckpt_up_proj_name}
    raw = _read_checkpoint(model_dir, {k: f"{prefix}.{expert}.{v}.weight"
                                      for k, v in names.items()})
    w13 = torch.cat([raw["gate"], raw["up"]], dim=0)
    w2 = raw["down"]
    dtype = module.w13_weight.dtype
    scratch = torch.nn.Module()
    scratch.w13_weight = torch.nn.Parameter(w13.to(dtype)[None].contiguous(), requires_grad=False)
    scratch.w2_weight = torch.nn.Parameter(w2.to(dtype)[None].contiguous(), requires_grad=False)
    qm = module.quant_method
    pad = getattr(qm, "_maybe_pad_weight", None)
    if pad is not None:
        scratch.w13_weight.data = pad(scratch.w13_weight.data)
        scratch.w2_weight.data = pad(scratch.w2_weight.data)
    kernel = getattr(qm, "moe_kernel", None)
    fused = getattr(kernel, "fused_experts", None)
    if fused is not None:
        fused.process_weights_after_loading(scratch)
    return {"w13_weight": scratch.w13_weight.data[0], "w2_weight": scratch.w2_weight.data[0]}


_index_cache: dict[str, dict[str, str]] = {}


def _read_checkpoint(model_dir: str, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = _index_cache.get(model_dir)
    if index is None:
        index = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    index[k] = str(f)
        _index_cache[model_dir] = index
    out = {}
    for short, key in keys.items():
        if key not in index:
            raise KeyError(f"{key} is in no safetensors file of {model_dir}")
        with safe_open(index[key], "pt") as h:
            out[short] = h.get_tensor(key)
    return out
