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

import importlib
import importlib.abc
import inspect
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

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
)

_MARK = "__resilient_ep_patch__"


class PatchError(RuntimeError):
    """The installed vLLM is not the one a patch was written against."""


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


def expect_signature(name: str, func: Callable[..., Any], params: Iterable[str]) -> None:
    """Raise :class:`PatchError` unless ``func`` takes exactly ``params`` (in order)."""
    target = getattr(func, "__wrapped__", func) if is_marked(func) else func
    got = list(inspect.signature(target).parameters)
    want = list(params)
    if got != want:
        raise PatchError(
            f"{name}: {getattr(target, '__qualname__', target)} takes {got}, "
            f"the patch expects {want}; see patches/{name}.md"
        )


def expect_overrides(name: str, base: type, methods: dict[str, Iterable[str]]) -> None:
    """Our subclasses of vLLM classes are checked like patches: every method they override
    or call must still exist on ``base`` with exactly these parameters."""
    for method, params in methods.items():
        func = getattr(base, method, None)
        if func is None:
            raise PatchError(f"{name}: {base.__qualname__}.{method} is gone; see patches/{name}.md")
        expect_signature(name, func, params)


def mark(func: Callable[..., Any], name: str, wrapped: Callable[..., Any] | None) -> Callable[..., Any]:
    setattr(func, _MARK, name)
    if wrapped is not None:
        func.__wrapped__ = wrapped  # type: ignore[attr-defined]
    return func


def is_marked(func: Any, name: str | None = None) -> bool:
    got = getattr(func, _MARK, None)
    return got is not None and (name is None or got == name)


def apply_patches(modules: Iterable[str] = CPU_EP_PATCHES) -> list[str]:
    """Check and apply the named patch modules; returns the ledger names applied."""
    names = []
    for path in modules:
        mod = importlib.import_module(path)
        mod.check()
        mod.apply()
        names.append(mod.NAME)
    return names


def apply_when_imported(modules: Iterable[str] = CPU_EP_PATCHES,
                        on_applied: Callable[[str], None] | None = None) -> None:
    """Check and apply each patch when its ``TARGET_MODULE`` is imported (now if it is).

    A :class:`PatchError` then surfaces from the import of the target module: loud, and
    before any patched code runs.
    """
    for path in modules:
        mod = importlib.import_module(path)  # our module: imports no vLLM at import time

        def run(mod=mod) -> None:
            if not mod.is_applied():
                mod.check()
                mod.apply()
                if on_applied is not None:
                    on_applied(mod.NAME)

        _when_imported(mod.TARGET_MODULE, run)


_pending: dict[str, list[Callable[[], None]]] = {}
_pending_lock = threading.Lock()


def _when_imported(name: str, fn: Callable[[], None]) -> None:
    with _pending_lock:
        if name not in sys.modules:
            _pending.setdefault(name, []).append(fn)
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    fn()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs the callbacks registered for a module right after the module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PostImportLoader(spec.loader, fullname)
                return spec
        return None


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        with _pending_lock:
            callbacks = _pending.pop(self._fullname, [])
        for fn in callbacks:
            fn()

    def __getattr__(self, name):  # get_source, is_package, ... for tools that ask
        return getattr(self._loader, name)


def applied_patches(modules: Iterable[str] = CPU_EP_PATCHES) -> list[str]:
    """Ledger names of the patches installed in this process (imports nothing new)."""
    import sys

    out = []
    for path in modules:
        mod = sys.modules.get(path)
        if mod is not None and mod.is_applied():
            out.append(mod.NAME)
    return out
