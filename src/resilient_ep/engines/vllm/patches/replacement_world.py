"""Ledger entry ``vllm-replacement-world`` (patches/vllm-engine-rejoin.md, same page).

Why: vLLM's ``init_distributed_environment`` forms one torch.distributed world across every
DP rank, on a TCPStore DP rank 0 hosted at the start. A replacement worker for a lost rank
(``joining.py``) cannot join that world: its peers formed it long ago, and the store is gone.

How (only in a replacement, ``RESILIENT_EP_REJOIN`` set): ``init_distributed_environment``
as the worker module calls it first forms the same world alone
(:func:`~resilient_ep.engines.vllm.joining.init_private_world`), then runs the original,
which finds it formed and builds its groups on it. Otherwise the original runs.
"""

from __future__ import annotations

import functools

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-replacement-world"
TARGET_MODULE = "vllm.v1.worker.gpu_worker"
_PARAMS = ("world_size", "rank", "distributed_init_method", "local_rank", "backend", "timeout")


def _module():
    import vllm.v1.worker.gpu_worker as m

    return m


def check() -> None:
    check_version(NAME)
    expect_signature(NAME, _module().init_distributed_environment, _PARAMS)


def is_applied() -> bool:
    return is_marked(_module().init_distributed_environment, NAME)


def apply() -> None:
    m = _module()
    original = m.init_distributed_environment
    if is_marked(original, NAME):
        return

    @functools.wraps(original)
    def init_distributed_environment(world_size=-1, rank=-1, distributed_init_method="env://",
                                     local_rank=-1, backend="nccl", timeout=None):
        from ..joining import init_private_world
        from ..replacement import is_replacement

        if is_replacement():
            from vllm.config import get_current_vllm_config

            init_private_world(get_current_vllm_config(), world_size, rank)
        return original(world_size, rank, distributed_init_method, local_rank, backend, timeout)

    m.init_distributed_environment = mark(init_distributed_environment, NAME, original)
