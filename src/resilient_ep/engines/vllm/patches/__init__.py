"""Runtime patches for what vLLM lacks, one module per upstream symbol.

Each module names its ledger entry (``patches/vllm-<name>.md`` at the repository root: why,
how, the vLLM version checked, when it can go, and the change as a diff against upstream)
and exposes the same small interface:

- ``NAME``: the ledger entry's name (``vllm-<name>``);
- ``check()``: raises :class:`PatchError` unless the installed vLLM still has the upstream
  symbol this patch was written against (version and signature);
- ``apply()``: installs the patch; applying twice is a no-op (the replacement is marked);
- ``is_applied()``.

- ``TARGET_MODULE``: the vLLM module holding the patched symbol.

Patches are applied only where resilience is enabled (see ``plugin.py``): without
``--enable-resilience`` the plugin leaves vLLM exactly as it is. And only where the patched
code is loaded: :func:`apply_when_imported` patches a module right after it is first imported
(at once if it is loaded already), so an API-server process, which never imports the MoE
kernels, never pays for them.
"""

from __future__ import annotations

from collections.abc import Iterable

from ...common import patching
from ...common.patching import (PatchError, expect_overrides, expect_signature, is_marked,
                                mark)
from ...common.patching import when_imported as _when_imported  # noqa: F401 (tests use it)

__all__ = ["expect_overrides", "PatchError", "CPU_EP_PATCHES", "FAILOVER_PATCHES", "apply_patches", "apply_when_imported",
           "applied_patches", "expect_signature", "mark", "is_marked", "vllm_version"]

# The vLLM versions every patch here was checked against. Anything else fails loudly.
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)

# Patches that make expert parallelism work on vLLM's CPU backend.
CPU_EP_PATCHES = (
    "resilient_ep.engines.vllm.patches.cpu_moe_expert_map",
    "resilient_ep.engines.vllm.patches.cpu_communicator_gatherv",
)

# Patches that let a DP + EP instance on the CPU backend survive a dead engine rank.
FAILOVER_PATCHES = (
    "resilient_ep.engines.vllm.patches.dp_batch_sync",
    "resilient_ep.engines.vllm.patches.cpu_resilient_all2all",
    "resilient_ep.engines.vllm.patches.engine_core_failover",
    "resilient_ep.engines.vllm.patches.expert_replicas",
    "resilient_ep.engines.vllm.patches.dp_client_failover",
    "resilient_ep.engines.vllm.patches.cpu_moe_opaque_op",
    "resilient_ep.engines.vllm.patches.worker_step_rerun",
    "resilient_ep.engines.vllm.patches.engine_manager_failover",
    "resilient_ep.engines.vllm.patches.engine_rejoin",
    "resilient_ep.engines.vllm.patches.replacement_world",
    "resilient_ep.engines.vllm.patches.replacement_memory_bind",
)


def vllm_version() -> str:
    from vllm import __version__

    return __version__.split("+", 1)[0]


def check_version(name: str) -> None:
    version = vllm_version()
    if version not in SUPPORTED_VLLM_VERSIONS:
        raise PatchError(
            f"{name}: written against vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, "
            f"found {version}; re-check patches/{name}.md against this vLLM before use"
        )


def apply_patches(modules: Iterable[str] = CPU_EP_PATCHES) -> list[str]:
    """Check and apply the named patch modules; returns the ledger names applied."""
    return patching.apply_patches(modules)


def apply_when_imported(modules: Iterable[str] = CPU_EP_PATCHES, on_applied=None) -> None:
    """Check and apply each patch when its ``TARGET_MODULE`` is imported (now if it is);
    see :func:`resilient_ep.engines.common.patching.apply_when_imported`."""
    patching.apply_when_imported(modules, on_applied)


def applied_patches(modules: Iterable[str] = CPU_EP_PATCHES) -> list[str]:
    """Ledger names of the patches installed in this process (imports nothing new)."""
    return patching.applied_patches(modules)
