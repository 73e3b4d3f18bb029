"""Shared by the real-engine test groups (``vllm/``, ``sglang/``; each skips itself where its
engine is not installed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random Qwen3-MoE (2 layers, hidden 128, 8 experts, top-2) in fp32."""
    from resilient_ep.runtime.model_builder import make_model

    root = os.environ.get("RESILIENT_EP_TEST_MODEL_DIR")
    out = Path(root) if root else tmp_path_factory.mktemp("model") / "tiny-moe"
    return make_model(out)
