"""Ledger entry ``sglang-cpu-empty-cache`` (patches/sglang-cpu-empty-cache.md).

Why: SGLang frees cached device memory after moving expert weights
(``eplb/expert_location_updater.py``, ``eplb/expert_distribution.py``) with
``torch.get_device_module().empty_cache()``. On the CPU that is ``torch.cpu``, which has no
``empty_cache`` in torch 2.13: ``AttributeError`` the first time an expert layout changes.

How: ``torch.cpu.empty_cache`` is added as a no-op (the CPU allocator keeps no cache to
return). Applied when SGLang's expert-location updater is imported; nothing to wrap, so no
``HookRegistry`` hook applies.
"""

from __future__ import annotations

import torch

from . import PatchError, check_version, is_marked, mark

NAME = "sglang-cpu-empty-cache"
TARGET_MODULE = "sglang.srt.eplb.expert_location_updater"


def check() -> None:
    check_version(NAME)
    existing = getattr(torch.cpu, "empty_cache", None)
    if existing is not None and not is_marked(existing, NAME):
        raise PatchError(f"{NAME}: torch.cpu.empty_cache exists in torch {torch.__version__}; "
                         f"drop this patch (patches/{NAME}.md)")


def is_applied() -> bool:
    return is_marked(getattr(torch.cpu, "empty_cache", None), NAME)


def empty_cache() -> None:
    """The CPU allocator caches nothing to give back."""


def apply() -> None:
    if not is_applied():
        torch.cpu.empty_cache = mark(empty_cache, NAME, None)
