"""The probe forward a replacement rank runs before it joins, and a survivor runs alike
(``rejoin.py`` compares them; the inputs, fingerprints and comparison are the core's
:mod:`resilient_ep.probe`).

- **Dense modules**: every module of the model that holds weights and can run alone, run on
  its probe input with the kernels this process serves with: linear layers (attention
  projections, the MoE router), norms, the embedding and the LM head. The weights a rank
  serves with never change, so each worker computes this once, in the background right after
  its weights are loaded (:func:`start`), like the weight digest: a survivor asked at a rejoin
  answers from the cache.
- **Experts**: each routed expert the replacement holds, run alone through the layer's own
  expert kernel (vLLM's ``fused_experts.apply``, the kernel the MoE pass calls after its
  dispatch: no collective) with every probe token routed to it. A survivor computes the same
  expert with its kernel from its own slot when it holds it, else from the node's host
  backup, the survivors' export or the model files.

What it cannot run alone is not probed: the attention kernel itself (it needs the forward
context and a KV cache) and the MoE dispatch (collective).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

import torch

from resilient_ep.probe import PROBE_TOKENS, expert_key, fingerprint, probe_input, probe_token_ids

__all__ = ["dense_probe", "start", "expert_probe", "experts_kernel"]

log = logging.getLogger("vllm." + __name__)

_lock = threading.Lock()
_dense: dict[str, Any] = {}


def _probe_module(name: str, module: Any) -> torch.Tensor | None:
    """``module``'s output on its probe input (None: not a kind of module probed alone)."""
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                     VocabParallelEmbedding)

    weight = next(module.parameters(recurse=False), None)
    if weight is None:
        return None
    device = weight.device
    if isinstance(module, ParallelLMHead):
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        x = probe_input(name, (PROBE_TOKENS, int(module.embedding_dim)), dtype, device)
        return module.quant_method.apply(module, x)
    if isinstance(module, VocabParallelEmbedding):
        return module(probe_token_ids(name, module.org_vocab_size, device=device))
    if isinstance(module, LinearBase):
        width = getattr(module, "input_size_per_partition", None) or module.input_size
        dtype = getattr(module, "params_dtype", None) or weight.dtype
        out = module(probe_input(name, (PROBE_TOKENS, int(width)), dtype, device))
        return out[0] if isinstance(out, tuple) else out
    if isinstance(module, RMSNorm):
        x = probe_input(name, (PROBE_TOKENS, int(weight.shape[-1])), weight.dtype, device)
        out = module(x)
        return out[0] if isinstance(out, tuple) else out
    return None


def dense_probe(model: Any, routed=frozenset()) -> dict[str, Any]:
    """``{"dense": {module name: fingerprint}, "skipped": {module name: why}}`` of ``model``
    (computed once per process; ``routed``: the ``id()`` of each routed-expert parameter,
    whose modules are probed by :func:`expert_probe` instead)."""
    with _lock:
        if _dense:
            return dict(_dense)
        dense, skipped = {}, {}
        with torch.inference_mode():
            for name, module in model.named_modules():
                params = list(module.parameters(recurse=False))
                if not params or any(id(p) in routed for p in params):
                    continue
                try:
                    out = _probe_module(name, module)
                except Exception as e:  # a module that cannot run alone here
                    skipped[name] = f"{type(e).__name__}: {e}"[:200]
                    continue
                if out is None:
                    skipped[name] = type(module).__name__
                else:
                    dense[name] = fingerprint(name, out)
        _dense.update({"dense": dense, "skipped": skipped})
        return dict(_dense)


def start(model: Any, routed=frozenset()) -> None:
    """Compute the dense probe in the background (after the weights are loaded)."""
    def run() -> None:
        try:
            dense_probe(model, routed)
        except Exception:
            log.exception("resilient-ep: the dense probe failed")

    threading.Thread(target=run, daemon=True, name="resilient-ep-probe").start()


def experts_kernel(module: Any):
    """The expert kernel of vLLM's ``RoutedExperts`` ``module`` (what runs after the
    dispatch), or None where the layer has none to call alone."""
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    return getattr(kernel, "fused_experts", None)


def _run_expert(module: Any, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert (its per-slot tensors, runtime format) through ``module``'s kernel, every
    token of ``x`` routed to it with weight 1."""
    fe = experts_kernel(module)
    w1, w2 = tensors["w13_weight"][None], tensors["w2_weight"][None]
    tokens = x.shape[0]
    topk_weights = torch.ones((tokens, 1), dtype=torch.float32, device=x.device)
    topk_ids = torch.zeros((tokens, 1), dtype=torch.int32, device=x.device)
    ws13, ws2, out_shape = fe.workspace_shapes(tokens, int(w1.shape[1]), int(x.shape[-1]), 1, 1,
                                               1, None, module.activation)
    dtype = x.dtype
    out = torch.empty(out_shape, dtype=dtype, device=x.device)
    fe.apply(out, x, w1, w2, topk_weights, topk_ids, module.activation, 1, None, None, None,
             torch.empty(ws13, dtype=dtype, device=x.device),
             torch.empty(ws2, dtype=dtype, device=x.device), None, False)
    return out


def _why_not(module: Any, names: set[str]) -> str | None:
    fe = experts_kernel(module)
    if fe is None:
        return "the layer has no expert kernel to call alone"
    if names != {"w13_weight", "w2_weight"}:
        return f"per-expert tensors {sorted(names)} (quantized experts are not probed)"
    if getattr(fe, "w1_bias", None) is not None or getattr(fe, "w2_bias", None) is not None:
        return "expert biases (not probed)"
    return None


def expert_probe(state: Any, wanted: list[tuple[str, int]] | None = None,
                 export_root: str | None = None) -> dict[str, Any]:
    """Fingerprints of experts run alone through this worker's kernels.

    ``wanted`` None: every expert this rank holds, from its slots (a replacement's side).
    Otherwise ``[(layer name, expert), ...]`` (a survivor's side): each from its own settled
    slot when it holds one, else from the host backup, ``export_root`` (the survivors'
    export) or the model files; one it can get from none is left out (``missing``)."""
    from resilient_ep.repair import HostBackup

    from .expert_weights import disk_expert, slot_params

    layers = {layer.name: layer for layer in state.layers}
    held = state.settled_slots()  # expert -> local slot
    export = HostBackup(export_root) if export_root else None
    if wanted is None:
        wanted = [(name, e) for name in layers for e in sorted(held)]
    out: dict[str, Any] = {"experts": {}, "pairs": [], "sources": Counter(), "missing": [],
                           "skipped": None}
    with torch.inference_mode():
        for name, e in wanted:
            layer = layers.get(name)
            if layer is None:
                out["missing"].append([name, int(e)])
                continue
            params = dict(slot_params(layer.module))
            why = _why_not(layer.module, set(params))
            if why is not None:
                out["skipped"] = why
                break
            tensors, source = None, None
            if int(e) in held:
                tensors = {n: p.data[held[int(e)]] for n, p in params.items()}
                source = "slot"
            else:
                for kind, src in (("host", state.backup), ("peer", export)):
                    if src is not None and src.has(name, int(e)):
                        tensors, source = src.get(name, int(e)), kind
                        break
                if tensors is None and state.model_dir and state.disk_ok:
                    tensors, source = disk_expert(layer.module, state.model_dir, int(e)), "disk"
            if tensors is None:
                out["missing"].append([name, int(e)])
                continue
            ref = next(iter(params.values()))
            width = int(layer.module.hidden_size)
            x = probe_input(expert_key(name, -1), (PROBE_TOKENS, width),
                            getattr(layer.module, "params_dtype", None) or ref.dtype, ref.device)
            key = expert_key(name, int(e))
            out["experts"][key] = fingerprint(key, _run_expert(layer.module, tensors, x))
            out["pairs"].append([name, int(e)])
            out["sources"][source] += 1
    out["sources"] = dict(out["sources"])
    return out
