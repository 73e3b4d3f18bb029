"""The plumbing of runtime patches, shared by every engine adapter.

Each adapter's ``patches`` package holds one module per ledger entry (``patches/<engine>-
<name>.md`` at the repository root), with the same small interface: ``NAME``,
``TARGET_MODULE``, ``check()`` (raises :class:`PatchError` unless the installed engine still
has the upstream symbol the patch was written against), ``apply()`` (idempotent) and
``is_applied()``. This module gives them:

- :class:`PatchError`, :func:`expect_signature`, :func:`expect_overrides`: loud checks of the
  upstream symbol;
- :func:`mark` / :func:`is_marked`: a patched function carries the name of its entry, so
  applying twice is a no-op and tests can see what is installed;
- :func:`apply_when_imported`: check and apply a patch right after its target module is first
  imported (at once if it is loaded already), so a process that never imports the patched
  code (an API server, a detokenizer) never pays for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import inspect
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PatchError", "expect_signature", "expect_overrides", "mark", "is_marked",
           "apply_patches", "apply_when_imported", "applied_patches", "when_imported"]

_MARK = "__resilient_ep_patch__"


class PatchError(RuntimeError):
    """The installed engine is not the one a patch was written against."""


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
    """Our subclasses of engine classes are checked like patches: every method they override
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


def apply_patches(modules: Iterable[str]) -> list[str]:
    """Check and apply the named patch modules; returns the ledger names applied."""
    names = []
    for path in modules:
        mod = importlib.import_module(path)
        mod.check()
        mod.apply()
        names.append(mod.NAME)
    return names


def apply_when_imported(modules: Iterable[str],
                        on_applied: Callable[[str], None] | None = None) -> None:
    """Check and apply each patch when its ``TARGET_MODULE`` is imported (now if it is).

    A :class:`PatchError` then surfaces from the import of the target module: loud, and
    before any patched code runs.
    """
    for path in modules:
        mod = importlib.import_module(path)  # our module: imports no engine at import time

        def run(mod=mod) -> None:
            if not mod.is_applied():
                mod.check()
                mod.apply()
                if on_applied is not None:
                    on_applied(mod.NAME)

        when_imported(mod.TARGET_MODULE, run)


def applied_patches(modules: Iterable[str]) -> list[str]:
    """Ledger names of the patches installed in this process (imports nothing new)."""
    out = []
    for path in modules:
        mod = sys.modules.get(path)
        if mod is not None and mod.is_applied():
            out.append(mod.NAME)
    return out


_pending: dict[str, list[Callable[[], None]]] = {}
_pending_lock = threading.Lock()


def when_imported(name: str, fn: Callable[[], None]) -> None:
    """Run ``fn()`` right after module ``name`` is first imported (now if it is loaded)."""
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
