"""Ledger entry ``vllm-replacement-memory-bind`` (patches/vllm-replacement-memory-bind.md).

Why: vLLM's ``CPUWorker.__init__`` binds the worker's memory to its NUMA node with
``torch.ops._C.init_cpu_memory_env``, which calls the ``migrate_pages`` system call. In a
replacement, started while the other ranks keep both cores busy, that call stopped for
minutes in the kernel (``__lru_add_drain_all`` waiting for per-CPU work; the process in
uninterruptible sleep, so it could neither dump its stacks nor die, and the next attempt
queued behind it), twice in a row in one run. On a host with one memory node there is
nothing to bind or migrate.

How (only in a replacement, ``RESILIENT_EP_REJOIN`` set, and only when the host shows one
memory node): during the original ``__init__``, ``init_cpu_memory_env`` is a logged no-op.
Otherwise the original runs unchanged.
"""

from __future__ import annotations

import functools
import logging

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-replacement-memory-bind"
TARGET_MODULE = "vllm.v1.worker.cpu_worker"
_PARAMS = ("self", "vllm_config", "local_rank", "rank", "distributed_init_method",
           "is_driver_worker")

log = logging.getLogger("vllm." + __name__)


def _target():
    from vllm.v1.worker.cpu_worker import CPUWorker

    return CPUWorker


def check() -> None:
    check_version(NAME)
    expect_signature(NAME, _target().__init__, _PARAMS)


def is_applied() -> bool:
    return is_marked(_target().__init__, NAME)


def _one_memory_node() -> bool:
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    return len(get_visible_memory_node()) == 1


def apply() -> None:
    cls = _target()
    original = cls.__dict__["__init__"]
    if is_marked(original, NAME):
        return

    @functools.wraps(original)
    def __init__(self, vllm_config, local_rank, rank, distributed_init_method,
                 is_driver_worker=False):
        from ..replacement import is_replacement

        if not (is_replacement() and _one_memory_node()):
            return original(self, vllm_config, local_rank, rank, distributed_init_method,
                            is_driver_worker)
        import torch

        ops = torch.ops._C
        bind = ops.init_cpu_memory_env

        def skip(nodes):
            log.info("resilient-ep: replacement worker: one memory node (%s), its memory "
                     "binding and page migration skipped", nodes)

        ops.init_cpu_memory_env = skip
        try:
            return original(self, vllm_config, local_rank, rank, distributed_init_method,
                            is_driver_worker)
        finally:
            ops.init_cpu_memory_env = bind

    cls.__init__ = mark(__init__, NAME, original)
