"""Runtime patches for what SGLang lacks, one module per upstream symbol.

Each module names its ledger entry (``patches/sglang-<name>.md`` at the repository root:
why, how, the SGLang version checked, when it can go, and the change as a diff against
upstream) and has the interface of :mod:`resilient_ep.engines.common.patching`: ``NAME``,
``TARGET_MODULE``, ``check()``, ``apply()`` (idempotent), ``is_applied()``.

SGLang's own plugin API comes first: a patch that wraps or replaces an existing function
registers it with SGLang's ``HookRegistry`` (:func:`hook`: ``BEFORE`` / ``AFTER`` /
``AROUND`` / ``REPLACE``), and checks afterwards that the registry really installed it
(the registry logs and skips a target it has patched before; we fail loudly instead).
Only what no hook can express (adding a method a class lacks) is set directly.

Patches are applied only where resilience is on (``plugin.py``) and only where the patched
code is loaded: :func:`~resilient_ep.engines.common.patching.apply_when_imported` hooks a
module right after its first import, so the detokenizer and the HTTP front end, which never
import the MoE layers, are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ...common import patching
from ...common.patching import PatchError, expect_signature, is_marked, mark

__all__ = ["PatchError", "CPU_PATCHES", "FAILOVER_PATCHES", "SUPPORTED_SGLANG_VERSIONS", "check_version",
           "sglang_version", "hook", "hooked", "install_hooks", "hooks_installed", "unwrapped",
           "expect_signature", "mark", "is_marked",
           "apply_when_imported", "applied_patches"]

SUPPORTED_SGLANG_VERSIONS = ("0.5.23",)
"""The SGLang versions every patch here was checked against. Anything else fails loudly."""

CPU_PATCHES = (
    "resilient_ep.engines.sglang.patches.cpu_moe_native_ep",
    "resilient_ep.engines.sglang.patches.torch_native_cpu_pad",
    "resilient_ep.engines.sglang.patches.cpu_reduce_scatterv",
    "resilient_ep.engines.sglang.patches.cpu_empty_cache",
)
"""What SGLang's CPU backend needs for expert parallelism with DP attention."""

FAILOVER_PATCHES = (
    "resilient_ep.engines.sglang.patches.tp_collectives",
    "resilient_ep.engines.sglang.patches.dp_batch_sync",
    "resilient_ep.engines.sglang.patches.scheduler_failover",
    "resilient_ep.engines.sglang.patches.expert_location",
    "resilient_ep.engines.sglang.patches.launch_failover",
    "resilient_ep.engines.sglang.patches.tokenizer_failover",
    "resilient_ep.engines.sglang.patches.dp_controller_failover",
    "resilient_ep.engines.sglang.patches.kv_checkpoints",
)
"""The failover path (each hook checks at call time whether failover applies: resilience on,
DP attention with one attention-DP and one EP rank per scheduler, 2 or more; elsewhere it hands
straight to SGLang's code)."""

PLUGIN_SOURCE = ("resilient_ep", "resilient-ep")


def sglang_version() -> str:
    from sglang.version import __version__

    return __version__.split("+", 1)[0]


def check_version(name: str) -> None:
    version = sglang_version()
    if version not in SUPPORTED_SGLANG_VERSIONS:
        raise PatchError(
            f"{name}: written against SGLang {', '.join(SUPPORTED_SGLANG_VERSIONS)}, "
            f"found {version}; re-check patches/{name}.md against this SGLang before use")


def _registry():
    from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

    return HookRegistry, HookSource, HookType


def hook(name: str, target: str, fn: Callable[..., Any], kind: str = "AROUND") -> None:
    """Install ``fn`` on ``target`` through SGLang's ``HookRegistry`` (``kind``: BEFORE,
    AFTER, AROUND or REPLACE); raises :class:`PatchError` if the registry did not install it
    (e.g. another plugin hooked ``target`` before: the registry applies a target once)."""
    if hooked(target, fn):
        return
    registry, source, types = _registry()
    registry.register(target, fn, getattr(types, kind), source=source(*PLUGIN_SOURCE))
    registry.apply_hooks()
    if not hooked(target, fn):
        raise PatchError(f"{name}: SGLang's HookRegistry did not install our {kind} hook on "
                         f"{target} (patched before by another plugin?); see patches/{name}.md")


def hooked(target: str, fn: Callable[..., Any]) -> bool:
    """True when ``fn`` is registered on ``target`` and the registry has applied it."""
    try:
        registry, _, _ = _registry()
    except ImportError:
        return False
    hooks = registry._hooks.get(target, ())
    return target in registry._patched and any(h is fn for _, h, _ in hooks)


def unwrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The upstream function under any wrappers (the ``__wrapped__`` chain that ours and the
    registry's leave), for signature checks once hooked."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def install_hooks(name: str, hooks: Iterable[tuple[str, Callable[..., Any], str]]) -> None:
    """``hook`` each ``(target, fn, kind)`` of a patch module."""
    for target, fn, kind in hooks:
        hook(name, target, fn, kind)


def hooks_installed(hooks: Iterable[tuple[str, Callable[..., Any], str]]) -> bool:
    return all(hooked(target, fn) for target, fn, _ in hooks)


def apply_when_imported(modules: Iterable[str] = CPU_PATCHES, on_applied=None) -> None:
    patching.apply_when_imported(modules, on_applied)


def applied_patches(modules: Iterable[str] = CPU_PATCHES) -> list[str]:
    return patching.applied_patches(modules)
