"""Ledger entry ``vllm-cpu-moe-opaque-op`` (patches/vllm-cpu-moe-opaque-op.md).

Why: on the CPU platform ``MoERunner._select_forward`` returns the Python function
``_moe_forward`` instead of vLLM's ``torch.ops.vllm.moe_forward`` custom op, so in vLLM's
default mode (torch.compile, Dynamo fullgraph) the compiler traces through the MoE layer into
the expert-parallel all-to-all. Our all-to-all (``all2all.py``) exchanges tensors over ZeroMQ
in Python (sockets, buffers, a failure detector): Dynamo cannot trace it (``memoryview`` on an
ndarray) and every worker fails at start. A collective that may raise ``PeerLost`` has to be
opaque to the compiler anyway: the step must fail and be re-run, not be baked into a graph.

How (only when failover applies: resilience on, DP > 1, EP, CPU): return the custom op that
every other platform already uses. The op's body is the same ``_moe_forward``; its fake
implementation is shape-preserving, so the compiled graph keeps the attention and the dense
parts and calls the MoE layer (router, dispatch, experts, combine) eagerly. Otherwise the
original runs.
"""

from __future__ import annotations

import functools

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-cpu-moe-opaque-op"
TARGET_MODULE = "vllm.model_executor.layers.fused_moe.runner.moe_runner"


def _target():
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return MoERunner


def check() -> None:
    check_version(NAME)
    cls = _target()
    expect_signature(NAME, cls._select_forward, ("self",))
    import torch

    for op in ("moe_forward", "moe_forward_shared"):
        if not hasattr(torch.ops.vllm, op):
            from . import PatchError

            raise PatchError(f"{NAME}: torch.ops.vllm.{op} is not registered any more")


def is_applied() -> bool:
    return is_marked(_target().__dict__.get("_select_forward"), NAME)


def apply() -> None:
    cls = _target()
    original = cls.__dict__["_select_forward"]
    if is_marked(original, NAME):
        return

    @functools.wraps(original)
    def _select_forward(self):
        import torch
        from vllm.config import get_current_vllm_config
        from vllm.platforms import current_platform

        from ..instance import failover_enabled

        if not (current_platform.is_cpu() and failover_enabled(get_current_vllm_config())):
            return original(self)
        if self._shared_experts is None:
            return torch.ops.vllm.moe_forward
        return torch.ops.vllm.moe_forward_shared

    cls._select_forward = mark(_select_forward, NAME, original)
