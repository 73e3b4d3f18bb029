"""The ``sglang.srt.plugins`` entry point of resilient-ep.

SGLang calls :func:`register` through ``load_plugins()`` in every process it starts (the
launcher / HTTP front end, the data-parallel controller, each scheduler, the detokenizer),
once per process. It is cheap: it arranges for the switches of ``cli_args.py`` to be hooked
(through SGLang's ``HookRegistry``) when SGLang's ``server_args`` / ``engine`` modules are
imported, and does nothing else unless resilience is on.

Resilience is turned on in the front-end process (``--enable-resilience``,
``--resilience-config``, ``--resilience-set``, ``Engine(resilience=...)``); the launch hook
validates the settings and hands them to the processes SGLang starts through the environment
(``config.ENV``), whose ``register()`` sees them and calls :func:`activate`: the patches of
``patches/`` are applied where their target modules are imported (only the schedulers load
the model code). Without any switch SGLang runs exactly as without the plugin.

``RESILIENT_EP_PLUGIN_TRACE=FILE`` logs each ``register`` / ``activate`` / ``patched`` event
(:mod:`resilient_ep.engines.common.trace`).
"""

from __future__ import annotations

import os

from ..common.patching import when_imported
from ..common.trace import trace
from . import config

__all__ = ["register", "activate", "is_active", "applied"]

_registered = False
_active = False
_applied: list[str] = []


def register() -> None:
    """Entry point (``sglang.srt.plugins``). Idempotent; imports no model code."""
    global _registered
    first = not _registered
    if first:
        _registered = True
        when_imported("sglang.srt.server_args", _install_flags)
        when_imported("sglang.srt.entrypoints.engine", _install_launch)
        if os.environ.get(config.ENV):
            activate()
    _trace("register", first=first)


def _install_flags() -> None:
    from . import cli_args

    cli_args.install_server_args()


def _install_launch() -> None:
    from . import cli_args

    cli_args.install_engine()


def is_active() -> bool:
    return _active


def applied() -> list[str]:
    return list(_applied)


def activate() -> list[str]:
    """Turn resilience on in this process: each patch is applied when its SGLang module is
    imported (at once if it is already)."""
    global _active
    if not _active:
        _active = True
        _trace("activate")
        from .patches import CPU_PATCHES, FAILOVER_PATCHES, apply_when_imported

        apply_when_imported(CPU_PATCHES + FAILOVER_PATCHES, on_applied=_patched)
    return list(_applied)


def _patched(name: str) -> None:
    _applied.append(name)
    _trace("patched", name=name)


def _trace(event: str, **extra) -> None:
    trace(event, engine="sglang", active=_active, applied=list(_applied), **extra)
