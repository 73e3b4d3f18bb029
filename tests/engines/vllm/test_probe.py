"""The rejoin probe forward on a real vLLM worker (``engines/vllm/probe.py``): every weighted
dense module runs alone, and each routed expert run alone through vLLM's own CPU expert kernel
gives what the HF model's expert computes from the model files; a slot changed in place is
caught. One in-process engine start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_harness import HERE, engine_env

pytestmark = pytest.mark.engine


def test_probe_runs_every_module_alone_and_experts_match_the_reference(tmp_path, tiny_model):
    out = tmp_path / "probe.json"
    spec = {"model": str(tiny_model), "out": str(out)}
    proc = subprocess.run([sys.executable, str(HERE / "probe_run.py"), json.dumps(spec)],
                          env=engine_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    dense = got["dense_modules"]
    assert got["skipped"] == {}, got["skipped"]
    # 2 layers x (qkv, o, q_norm, k_norm, input and post-attention norms, router) + embed,
    # final norm, LM head
    assert "lm_head" in dense and "model.embed_tokens" in dense and "model.norm" in dense
    assert {"model.layers.1.self_attn.qkv_proj", "model.layers.1.mlp.gate"} <= set(dense)
    assert len(dense) == 2 * 7 + 3, dense
    assert len(got["pairs"]) == 2 * 8 and got["sources"] == {"slot": 16}
    assert got["vs_reference"] == [], got["vs_reference"]
    assert [b["name"] for b in got["vs_perturbed"]] == ["layer0#expert2"], got["vs_perturbed"]
