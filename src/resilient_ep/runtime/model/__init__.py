"""Qwen3-MoE decoder in plain torch, cut into the pieces an expert-parallel runtime drives.

It loads a Hugging Face checkpoint directory (``config.json`` + safetensors) without
``transformers`` and reproduces ``Qwen3MoeForCausalLM`` in fp32 (greedy tokens identical).

Glossary
--------
- **logical expert** ``e in [0, E)``: an expert of the checkpoint (``mlp.experts.{e}``).
- **slot** (physical slot) ``s in [0, S)``: one place in a rank's ``ExpertBank`` that holds the
  weights of one logical expert (or nothing: ``-1``). Slots own storage; which expert a slot holds
  can change (``set_slot``), the storage never moves.
- **step**: one forward pass over a continuous batch; the batch's T new tokens are request 0's
  new tokens, then request 1's, ... (``AttentionBatch``).

Shapes: T tokens in the step, B requests, H hidden, NH query heads, KVH kv heads, D head dim,
I expert intermediate size, E logical experts, S slots of one layer, k top-k, V vocabulary.

How a runtime drives one step (single process: ``MoEModel.forward_step``)::

    h = model.embed(token_ids)                                   # [T, H]
    for layer in range(model.config.num_layers):
        h = model.attention(layer, h, batch, kv)                 # [T, H] (residual added)
        x, topk_ids, topk_weights = model.route(layer, h)        # [T, H], [T, k], [T, k]
        combined = <dispatch x to the ranks holding topk_ids, bank.forward there,
                    weight by topk_weights, combine>             # [T, H]  (or model.moe_local)
        h = model.moe_add(h, combined)                           # h + combined
    logits = model.logits(h[batch.last_token_index])             # [B, V]
"""

from .attention import AttentionBatch
from .checkpoint import CheckpointReader
from .config import MoEConfig
from .experts import ExpertBank
from .layers import Linear, rms_norm, rope_tables, rotate_half, swiglu
from .moe_model import MoEModel
from .weights import ExpertWeights, LayerWeights

__all__ = [
    "MoEConfig",
    "AttentionBatch",
    "ExpertWeights",
    "ExpertBank",
    "MoEModel",
    "CheckpointReader",
]
