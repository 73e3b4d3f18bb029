"""Ledger entry ``vllm-dp-batch-sync`` (patches/vllm-dp-batch-sync.md).

Why: before every forward pass each DP rank's worker all-reduces its token counts over the DP
group (``vllm.v1.worker.dp_utils._run_ar``, gloo on the CPU). With a dead DP rank the
all-reduce raises ("Connection closed by peer") or hangs, and the survivors cannot run.

How: when the worker failover group exists (resilience on, DP > 1, EP), the same [4, dp_size]
table is assembled from an all-gather among the live ranks (:mod:`..groups`); a dead rank's
column is 0, so vLLM's DP metadata gives it no tokens and the MoE exchange expects none.
Otherwise the original runs.
"""

from __future__ import annotations

import functools

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-dp-batch-sync"
TARGET_MODULE = "vllm.v1.worker.dp_utils"
_PARAMS = ("should_ubatch", "orig_num_tokens_per_ubatch", "padded_num_tokens_per_ubatch",
           "cudagraph_mode", "parallel_config")


def _module():
    import vllm.v1.worker.dp_utils as m

    return m


def check() -> None:
    check_version(NAME)
    expect_signature(NAME, _module()._run_ar, _PARAMS)


def is_applied() -> bool:
    return is_marked(_module()._run_ar, NAME)


def apply() -> None:
    m = _module()
    original = m._run_ar
    if is_marked(original, NAME):
        return

    @functools.wraps(original)
    def _run_ar(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                cudagraph_mode, parallel_config):
        from ..groups import current_worker_group

        group = current_worker_group()
        if group is None:
            return original(should_ubatch, orig_num_tokens_per_ubatch,
                            padded_num_tokens_per_ubatch, cudagraph_mode, parallel_config)
        import torch

        mine = torch.tensor([orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                             1 if should_ubatch else 0, cudagraph_mode], dtype=torch.int32)
        got = group.allgather([mine], strict=True)
        table = torch.zeros(4, int(parallel_config.data_parallel_size), dtype=torch.int32)
        for rank, (col,) in got.items():
            table[:, rank] = col
        return table

    m._run_ar = mark(_run_ar, NAME, original)
