"""Fault injection for the failure-model tests, timed by the engine's own progress.

With ``RESILIENT_EP_FAULT_INJECTION=1`` in the environment, each worker checks for the file
``<instance dir>/fault-dp<rank>`` at the start of every step that computes tokens. The file
(written by :func:`arm`) names an action and a number of such steps; the worker counts them
down and, at zero, removes the file, writes the time (``time.monotonic()``, one clock for the
whole host) to ``fault-dp<rank>.fired`` and does it:

- ``raise``: the step raises :class:`InjectedDeviceError` (a CUDA error, an OOM in a kernel);
- ``kill``: the worker SIGKILLs itself (the process that holds the accelerator dies);
- ``stop``: the worker SIGSTOPs itself (a wedged device or driver: the worker freezes);
- ``stop-engine``: the worker SIGSTOPs its engine core (the engine process freezes alone).

The signals are real (the kernel delivers them as it would from outside); what the trigger adds
is timing: a client on 2 shared cores can lag seconds behind the engine, so a fault timed by
what a client has received may land after the victim has finished its work. Counted in the
victim's steps, it always lands mid-generation.

Without the variable the check is never installed (read once per process): serving pays
nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["ACTIONS", "InjectedDeviceError", "arm", "enabled", "fired_at", "injected_delay_s",
           "maybe_fault", "trigger_path"]

_ENABLED = os.environ.get("RESILIENT_EP_FAULT_INJECTION") == "1"

ACTIONS = ("raise", "kill", "stop", "stop-engine")


class InjectedDeviceError(RuntimeError):
    """Stands for an accelerator error raised inside a worker's step."""


def enabled() -> bool:
    return _ENABLED


def injected_delay_s(name: str) -> float:
    """Seconds of an injected slowness, ``0`` unless ``RESILIENT_EP_FAULT_INJECTION=1``:
    ``RESILIENT_EP_REPAIR_DELAY_MS`` makes every repair copy start that much later (a slow
    source), ``RESILIENT_EP_EXPORT_DELAY_MS`` every expert a survivor exports for a rejoin
    (and the export, when it starts, creates ``export-ep<rank>`` in
    ``RESILIENT_EP_EXPORT_MARK_DIR``), ``RESILIENT_EP_JOIN_WAKE_DELAY_MS`` a replacement's
    news of its join (the front ends route to the rank meanwhile)."""
    if os.environ.get("RESILIENT_EP_FAULT_INJECTION") != "1":
        return 0.0
    return float(os.environ.get(name, "0") or 0) / 1000.0


def trigger_path(instance: str, dp_rank: int) -> Path:
    from .instance import instance_dir

    return instance_dir(instance) / f"fault-dp{dp_rank}"


def arm(instance: str, dp_rank: int, action: str, after_steps: int = 1) -> Path:
    """Make DP rank ``dp_rank``'s worker do ``action`` at its ``after_steps``-th step that
    computes tokens from now on. Returns the trigger file."""
    if action not in ACTIONS:
        raise ValueError(f"fault action must be one of {ACTIONS}, got {action!r}")
    if after_steps < 1:
        raise ValueError(f"after_steps must be >= 1, got {after_steps}")
    path = trigger_path(instance, dp_rank)
    Path(f"{path}.fired").unlink(missing_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{action} {after_steps}\n")
    tmp.replace(path)  # the worker never reads half a file
    return path


def fired_at(instance: str, dp_rank: int) -> float | None:
    """When the armed fault fired (``time.monotonic()``), or None if it has not."""
    try:
        return float(Path(f"{trigger_path(instance, dp_rank)}.fired").read_text())
    except (FileNotFoundError, ValueError):
        return None


_announced = False
_armed: dict[Path, list] = {}  # trigger -> [action, steps left]


def maybe_fault(instance: str, dp_rank: int) -> None:
    global _announced
    path = trigger_path(instance, dp_rank)
    if not _announced:
        _announced = True
        import logging

        logging.getLogger("vllm." + __name__).warning(
            "resilient-ep: fault injection on: a step faults as %s says", path)
    state = _armed.get(path)
    if state is None:
        try:
            action, steps = path.read_text().split()
            state = _armed[path] = [action, int(steps)]
        except (FileNotFoundError, ValueError):
            return
    state[1] -= 1
    if state[1] > 0:
        return
    del _armed[path]
    path.unlink(missing_ok=True)
    Path(f"{path}.fired").write_text(repr(time.monotonic()))
    action = state[0]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "stop-engine":
        os.kill(os.getppid(), signal.SIGSTOP)
    else:
        raise InjectedDeviceError(f"injected device error in the worker of DP{dp_rank}")
