"""Tests against real SGLang (0.5.23 on the CPU torch in ``.venv-sglang``;
``bash ci/setup-sglang.sh``).

Skipped where SGLang is not installed (the core's ``.venv``). An SGLang start costs 20-60 s
here, so each configuration starts once per module (module-scoped fixtures), and every
engine runs in a child process (a failed ``sglang.Engine`` start SIGKILLs the process that
made it).
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("sglang") is None:
    collect_ignore_glob = ["test_*.py"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
