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
from pathlib import Path

import pytest

if importlib.util.find_spec("sglang") is None:
    collect_ignore_glob = ["test_*.py"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random Qwen3-MoE (2 layers, hidden 128, 8 experts, top-2) in fp32."""
    from resilient_ep.runtime.model_builder import make_model

    root = os.environ.get("RESILIENT_EP_TEST_MODEL_DIR")
    out = Path(root) if root else tmp_path_factory.mktemp("model") / "tiny-moe"
    return make_model(out)
