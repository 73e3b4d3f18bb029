"""``RESILIENT_EP_PLUGIN_TRACE=FILE``: the engine plugins append one JSON line per event
(``register``, ``activate``, ``patched``) with the pid and process title; tests use it to show
that a plugin loads in every process of an engine and patches only where model code runs."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

__all__ = ["TRACE_ENV", "process_title", "trace"]

TRACE_ENV = "RESILIENT_EP_PLUGIN_TRACE"


def process_title() -> str:
    """What ``ps`` shows (engines rename their processes, e.g. ``VLLM::EngineCore_DP0``)."""
    try:
        with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return os.path.basename(sys.argv[0]) if sys.argv else ""


def trace(event: str, **fields: Any) -> None:
    """Append one record to the trace file, if one is set."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    record = {"event": event, "pid": os.getpid(), "ppid": os.getppid(), "time": time.time(),
              "title": process_title(), **fields}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
