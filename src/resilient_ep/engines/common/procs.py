"""Process helpers the engine adapters share."""

from __future__ import annotations

import os
import signal

__all__ = ["pid_state", "free_port", "kill_group", "signal_pid"]


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


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc, grace_s: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (a ``subprocess.Popen`` started with
    ``start_new_session=True``), then SIGKILL what is left after ``grace_s``."""
    import subprocess

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (engine processes, workers)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def signal_pid(pid, sig: int = signal.SIGKILL) -> None:
    """Signal one process of an instance. A pid read from a status is checked first: a dead
    rank's entry (0, None, -1) given to ``os.kill`` would signal the caller's own process
    group (pid 0) or every process it may signal (-1)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or pid == os.getpid():
        raise AssertionError(f"not a process of the instance to signal: {pid!r}")
    os.kill(pid, sig)
