"""Fault injection for the failure-model tests: a worker that raises, as on a device error.

A SIGKILL or SIGSTOP is injected from outside with a signal. A worker that *raises* (a CUDA
error, an OOM inside a kernel) needs a hook inside the step: with
``RESILIENT_EP_FAULT_INJECTION=1`` in the environment, each worker checks for the file
``<instance dir>/raise-dp<rank>`` at the start of a step and, when it exists, removes it and
raises :class:`InjectedDeviceError`. Without the variable the check is never installed (read
once per process), so serving pays nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["InjectedDeviceError", "enabled", "maybe_raise", "trigger_path"]

_ENABLED = os.environ.get("RESILIENT_EP_FAULT_INJECTION") == "1"


class InjectedDeviceError(RuntimeError):
    """Stands for an accelerator error raised inside a worker's step."""


def enabled() -> bool:
    return _ENABLED


def trigger_path(instance: str, dp_rank: int) -> Path:
    from .instance import instance_dir

    return instance_dir(instance) / f"raise-dp{dp_rank}"


_announced = False


def maybe_raise(instance: str, dp_rank: int) -> None:
    global _announced
    path = trigger_path(instance, dp_rank)
    if not _announced:
        _announced = True
        import logging

        logging.getLogger("vllm." + __name__).warning(
            "resilient-ep: fault injection on: a step raises once %s exists", path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    raise InjectedDeviceError(f"injected device error in the worker of DP{dp_rank}")
