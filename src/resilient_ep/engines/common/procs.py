"""Process helpers the engine adapters share."""

from __future__ import annotations

import os

__all__ = ["pid_state"]


def pid_state(pid: int) -> str:
    """``live`` or ``dead`` (gone, or a zombie nobody reaped yet) for a process id."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return "dead" if state in ("Z", "X") else "live"
    except FileNotFoundError:
        return "dead"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        return "live"
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "live"
