"""The SGLang plugin without starting an engine: the entry point, cheap idempotent
registration, the flags on SGLang's own parser, the settings carried on ``ServerArgs``, and
each runtime patch checked, applied twice and tested on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from resilient_ep.config import ConfigError
from resilient_ep.engines.sglang import config
from resilient_ep.engines.sglang.patches import CPU_PATCHES, FAILOVER_PATCHES, PatchError


def _parse(argv):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    return prepare_server_args(argv)


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("resilient_ep") == "resilient_ep.engines.sglang.plugin:register"


def test_register_is_cheap_and_idempotent(tmp_path):
    """In a fresh SGLang process: load_plugins() twice, register() once more: one first
    registration, no activation, and no model code imported by us."""
    trace = tmp_path / "trace.jsonl"
    code = (
        "import sys, json\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins(); load_plugins()\n"
        "from resilient_ep.engines.sglang import plugin\n"
        "plugin.register()\n"
        "heavy = [m for m in ('sglang.srt.layers.moe.fused_moe_native',"
        " 'sglang.srt.managers.scheduler', 'sglang.srt.model_executor.model_runner')"
        " if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'active': plugin.is_active()}))\n")
    env = {**_env(), "RESILIENT_EP_PLUGIN_TRACE": str(trace)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"heavy": [], "active": False}
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    regs = [e for e in events if e["event"] == "register"]
    assert [e["first"] for e in regs] == [True, False]
    assert not [e for e in events if e["event"] in ("activate", "patched")]


def _env():
    import os

    env = dict(os.environ)
    for k in ("RESILIENT_EP_SGLANG", "RESILIENT_EP_PLUGIN_TRACE", "SGLANG_PLUGINS"):
        env.pop(k, None)
    return env


def test_flags_show_in_sglangs_parser():
    import argparse

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    for flag in ("--enable-resilience", "--resilience-config", "--resilience-set"):
        assert flag in p._option_string_actions


def test_without_flags_nothing_changes(tiny_model):
    sa = _parse(["--model-path", str(tiny_model), "--tp-size", "2", "--dp-size", "2",
                 "--enable-dp-attention", "--ep-size", "2"])
    assert config.settings_of(sa) is None
    assert (sa.ep_num_redundant_experts, sa.init_expert_location, sa.enable_dp_lm_head) == (
        0, "trivial", False)


def test_yaml_and_overrides_reach_the_record(tiny_model, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("resilience:\n  detector:\n    heartbeat_timeout_ms: 2500\n")
    sa = _parse(["--model-path", str(tiny_model), "--resilience-config", str(f),
                 "--resilience-set", "detector.heartbeat_interval_ms=40"])
    got = config.settings_of(sa)
    assert got["detector"] == {"heartbeat_interval_ms": 40.0, "heartbeat_timeout_ms": 2500.0,
                               "crash_detection": True, "lease_ms": None}
    assert got["instance"]
    # TP=1: no failover topology, so SGLang's expert arguments stay untouched
    assert sa.ep_num_redundant_experts == 0 and sa.init_expert_location == "trivial"


def test_failover_topology_gets_the_cores_placement(tiny_model):
    sa = _parse(["--model-path", str(tiny_model), "--tp-size", "2", "--dp-size", "2",
                 "--enable-dp-attention", "--ep-size", "2", "--enable-resilience"])
    p2l = json.loads(sa.init_expert_location)["physical_to_logical_map"]
    assert sa.ep_num_redundant_experts == 8 and len(p2l) == 2 and len(p2l[0]) == 16
    assert sa.ep_dispatch_algorithm == "dynamic"
    assert sa.enable_dp_lm_head and sa.moe_dense_tp_size == 1
    assert sa.enable_dp_attention_local_control_broadcast


def test_bad_value_fails_naming_the_field(tiny_model):
    with pytest.raises(ConfigError, match=r"detector.heartbeat_interval_ms.*-5"):
        _parse(["--model-path", str(tiny_model), "--resilience-set",
                "detector.heartbeat_interval_ms=-5"])
    with pytest.raises(ConfigError, match="ep_num_redundant_experts"):
        _parse(["--model-path", str(tiny_model), "--tp-size", "2", "--dp-size", "2",
                "--enable-dp-attention", "--ep-size", "2", "--ep-num-redundant-experts", "2",
                "--enable-resilience"])


@pytest.mark.parametrize("path", CPU_PATCHES + FAILOVER_PATCHES)
def test_check_apply_idempotent(path):
    import importlib

    mod = importlib.import_module(path)
    assert mod.NAME.startswith("sglang-")
    mod.check()
    mod.apply()
    mod.apply()
    assert mod.is_applied()
    mod.check()  # still the upstream it was written against, once applied


def test_unsupported_version_fails_loudly(monkeypatch):
    from resilient_ep.engines.sglang import patches

    monkeypatch.setattr(patches, "sglang_version", lambda: "0.9.0")
    with pytest.raises(PatchError, match="written against SGLang 0.5.23, found 0.9.0"):
        patches.check_version("sglang-cpu-moe-native-ep")


def test_signature_mismatch_fails_loudly():
    from resilient_ep.engines.sglang.patches import expect_signature

    def moe_forward_native(layer, x, topk_output):  # an upstream that changed
        pass

    with pytest.raises(PatchError, match="sglang-cpu-moe-native-ep"):
        expect_signature("sglang-cpu-moe-native-ep", moe_forward_native,
                         ("layer", "x", "topk_output", "moe_runner_config"))


def test_moe_with_non_local_experts_sums_to_the_all_local_result():
    """Two EP ranks' partial outputs (non-local ids -1) add up to one rank holding all."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from resilient_ep.engines.sglang.patches import cpu_moe_native_ep as p

    p.apply()
    torch.manual_seed(0)
    E, H, I, T, k = 8, 16, 8, 12, 2
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    cfg = SimpleNamespace(apply_router_weight_on_input=False, activation="silu",
                          gemm1_alpha=None, gemm1_clamp_limit=None)
    full_layer = SimpleNamespace(num_experts=E, w13_weight=w13, w2_weight=w2)
    full = moe_forward_native(full_layer, x, StandardTopKOutput(w, ids, None), cfg)
    parts = []
    for r in range(2):
        lo = r * E // 2
        local = torch.where((ids >= lo) & (ids < lo + E // 2), ids - lo, torch.full_like(ids, -1))
        layer = SimpleNamespace(num_experts=E // 2, w13_weight=w13[lo:lo + E // 2],
                                w2_weight=w2[lo:lo + E // 2])
        parts.append(moe_forward_native(layer, x, StandardTopKOutput(w, local, None), cfg))
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-5)


def test_reduce_scatterv_without_pynccl_uses_sglangs_all_reduce_path():
    from resilient_ep.engines.sglang.patches.cpu_reduce_scatterv import reduce_scatterv_cpu

    calls = []
    group = SimpleNamespace(pynccl_comm=None, _deterministic_reduce_scatterv=lambda *a:
                            calls.append(a) or "det")
    x = torch.ones(4, 2)
    assert reduce_scatterv_cpu(lambda *a: "orig", group, x, None, [2, 2]) == "det"
    assert calls == [(x, None, [2, 2])]
    gpu_like = SimpleNamespace(pynccl_comm=SimpleNamespace(disabled=False))
    assert reduce_scatterv_cpu(lambda *a: "orig", gpu_like, x, None, [2, 2]) == "orig"


def test_torch_native_backend_pads_with_one_token():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from resilient_ep.engines.sglang.patches import torch_native_cpu_pad as p

    p.apply()
    assert TorchNativeAttnBackend.get_cpu_graph_seq_len_fill_value(object()) == 1


def test_cpu_empty_cache_exists_and_does_nothing():
    from resilient_ep.engines.sglang.patches import cpu_empty_cache as p

    p.apply()
    assert torch.get_device_module("cpu").empty_cache() is None
