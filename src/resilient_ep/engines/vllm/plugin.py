"""The ``vllm.general_plugins`` entry point of resilient-ep.

vLLM calls :func:`register` in every process it starts (API server, engine cores, workers),
sometimes more than once, and before it builds its CLI parser. It must be cheap and
idempotent: it wraps three ``EngineArgs`` methods (``cli_args.install``) and nothing else
unless resilience is on.

Resilience is turned on per engine, in the front-end process, by ``--enable-resilience``,
``--resilience-config``, ``--additional-config '{"resilience": {...}}'`` or
``LLM(..., additional_config={"resilience": {...}})``. The front end then calls
:func:`activate`, which marks the processes it is about to start through the environment
(``RESILIENT_EP_VLLM_ACTIVE=1``); their ``register()`` sees it and installs what the
resilience path needs there (on the CPU backend: the expert-parallel patches of ``patches/``).
Without any of these switches vLLM runs exactly as without the plugin.

Set ``RESILIENT_EP_PLUGIN_TRACE=FILE`` to append one JSON line per event (``register``,
``activate``, ``patched``) with the pid and process title; tests use it to show that the
plugin loads in every process and patches only where model code runs.
"""

from __future__ import annotations

import os

from ..common.trace import TRACE_ENV, trace  # noqa: F401 (TRACE_ENV re-exported)

__all__ = ["register", "activate", "deactivate_children", "is_active", "ACTIVE_ENV"]

ACTIVE_ENV = "RESILIENT_EP_VLLM_ACTIVE"

_registered = False
_active = False
_applied: list[str] = []


def register() -> None:
    """Entry point (``vllm.general_plugins``). Idempotent; imports no model code."""
    global _registered
    first = not _registered
    if first:
        from .cli_args import install
        from .replacement import REJOIN_ENV

        install()
        _registered = True
        if os.environ.get(REJOIN_ENV) is not None or os.environ.get(ACTIVE_ENV) == "1":
            import faulthandler
            import signal

            # a rank that hangs shows every thread's stack in the log before it is fenced
            # (fencing.RankProcesses.fence), a replacement that hangs in its start before the
            # rejoiner stops it (rejoin._kill_with_stacks)
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        if os.environ.get(ACTIVE_ENV) == "1":
            activate()
    _trace("register", first=first)


def is_active() -> bool:
    return _active


def activate() -> list[str]:
    """Turn resilience on in this process and in the processes it starts from now on.

    Backend patches are installed when their vLLM module is imported (at once if it is
    already): only processes that load the MoE kernels and communicators get them.
    """
    global _active
    os.environ[ACTIVE_ENV] = "1"
    if not _active:
        _active = True
        _trace("activate")
        _apply_backend_patches()
    return list(_applied)


def _patched(name: str) -> None:
    _applied.append(name)
    _trace("patched", name=name)


def deactivate_children() -> None:
    """An engine without resilience is being created: its processes must not inherit the
    switch from an earlier engine of this process."""
    os.environ.pop(ACTIVE_ENV, None)


def _apply_backend_patches() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from .patches import CPU_EP_PATCHES, FAILOVER_PATCHES, apply_when_imported

    # The failover patches check at call time whether failover applies (DP > 1 with EP);
    # elsewhere they hand straight to vLLM's code.
    apply_when_imported(CPU_EP_PATCHES + FAILOVER_PATCHES, on_applied=_patched)


def _trace(event: str, **extra) -> None:
    trace(event, active=_active, applied=list(_applied), **extra)
