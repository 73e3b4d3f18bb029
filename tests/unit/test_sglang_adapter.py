"""The SGLang adapter's pure parts, without SGLang: settings, flags, the launcher's command
line, the core's placement as SGLang arguments, the active expert map, the CPU MoE patch's
id filling."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from resilient_ep.config import ConfigError
from resilient_ep.engines.common.flags import add_resilience_args, fold_flags
from resilient_ep.engines.sglang import config, experts, launcher
from resilient_ep.engines.sglang.patches.cpu_moe_native_ep import fill_unused


def test_normalize_resolves_yaml_overrides_and_adds_an_instance(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("resilience:\n  detector:\n    heartbeat_timeout_ms: 900\n")
    out = config.normalize({"config_file": str(f), "overrides": ["detector.heartbeat_interval_ms=30"]})
    assert out["detector"]["heartbeat_timeout_ms"] == 900
    assert out["detector"]["heartbeat_interval_ms"] == 30
    assert len(out["instance"]) == 12
    again = config.normalize(out)  # idempotent: the instance id is kept
    assert again == out


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"detector.heartbeat_interval_ms.*-5"):
        config.normalize({"overrides": ["detector.heartbeat_interval_ms=-5"]})


@pytest.mark.parametrize("key,value", [("recovery.respawn", True), ("shadow.enabled", True),
                                       ("placement.redundant_slots_per_rank", 1),
                                       ("kv_checkpoint.max_stall_ms", 5),
                                       ("detector.lease_ms", 100)])
def test_what_sglang_does_not_implement_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"{key}.*not supported on sglang"):
        config.normalize({"overrides": [f"{key}={value}"]})


def test_off_is_off():
    assert config.normalize(None) is None
    assert config.normalize({"enabled": False}) is None


def test_settings_travel_through_the_environment():
    env: dict[str, str] = {}
    settings = config.normalize({})
    config.export(settings, env)
    cfg, instance = config.from_env(env)
    assert instance == settings["instance"] and cfg.detector.heartbeat_interval_ms == 50
    config.clear_env(env)
    assert config.from_env(env) is None
    with pytest.raises(ConfigError, match=config.ENV):
        config.from_env({config.ENV: "{not json"})


def test_flags_fold_into_the_settings():
    p = add_resilience_args(argparse.ArgumentParser())
    assert config.ATTR == "_resilience"
    args = p.parse_args(["--resilience-config", "r.yaml", "--resilience-set", "a.b=1",
                         "--resilience-set", "c.d=2"])
    assert fold_flags(args, None) == {"enabled": True, "config_file": "r.yaml",
                                      "overrides": ["a.b=1", "c.d=2"]}
    assert fold_flags(p.parse_args([]), None) is None
    assert fold_flags(args, fold_flags(args, None))["overrides"] == ["a.b=1", "c.d=2"]


def test_launcher_command_line():
    argv = launcher.server_argv(["/m", "--engine", "sglang", "--tp-size", "2",
                                 "--enable-resilience"], cpu=True, stub=True)
    assert argv[:2] == ["--model-path", "/m"]
    for pair in (["--host", "127.0.0.1"], ["--device", "cpu"],
                 ["--attention-backend", "torch_native"],
                 ["--cuda-graph-backend-decode", "disabled"]):
        assert any(argv[i:i + 2] == pair for i in range(len(argv)))
    mine = launcher.server_argv(["/m", "--host", "0.0.0.0", "--device", "cuda"], cpu=False,
                                stub=False)
    assert mine == ["--model-path", "/m", "--host", "0.0.0.0", "--device", "cuda"]
    with pytest.raises(SystemExit, match="runs sglang, not vllm"):
        launcher.server_argv(["/m", "--engine", "vllm"])
    with pytest.raises(SystemExit, match="both given"):
        launcher.server_argv(["/m", "--model-path", "/n"], cpu=False, stub=False)


def test_launcher_environment():
    env: dict[str, str] = {}
    got = launcher.prepare_environment(["--tp-size", "2"], env, cpu=True)
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and "|" in env["SGLANG_CPU_OMP_THREADS_BIND"]
    assert got == env
    env = {"SGLANG_CPU_OMP_THREADS_BIND": "0-3|4-7"}
    launcher.prepare_environment(["--tp-size", "2"], env, cpu=True)
    assert env["SGLANG_CPU_OMP_THREADS_BIND"] == "0-3|4-7", "what the user set wins"


def _hf(E=8, L=2):
    return SimpleNamespace(num_experts=E, num_hidden_layers=L, model_type="qwen3_moe")


def test_launch_settings_put_the_cores_mirror_in_sglangs_arguments():
    cfg = config.ResilienceConfig()
    out = experts.launch_settings(_hf(), 2, cfg, {})
    plan = experts.plan_for(8, 2, cfg)
    p2l = json.loads(out["init_expert_location"])["physical_to_logical_map"]
    assert out["ep_num_redundant_experts"] == plan.layout.num_slots - 8 == 8
    assert out["ep_dispatch_algorithm"] == "dynamic"
    assert len(p2l) == 2 and p2l[0] == p2l[1] == plan.layout.physical_to_logical[0].tolist()
    for r in range(2):  # the full mirror: every rank holds every expert once
        assert sorted(p2l[0][r * 8:(r + 1) * 8]) == list(range(8))
    with pytest.raises(ConfigError, match="ep_num_redundant_experts"):
        experts.launch_settings(_hf(), 2, cfg, {"ep_num_redundant_experts": 4})
    with pytest.raises(ConfigError, match="no routed experts"):
        experts.launch_settings(SimpleNamespace(num_hidden_layers=2, model_type="llama"), 2,
                                cfg, {})


def _metadata(plan, L=2):
    E, P = plan.E, plan.layout.num_slots
    p2l = plan.layout.physical_to_logical[0].repeat(L, 1)
    l2p = torch.full((L, E, P), -1, dtype=torch.int64)
    return SimpleNamespace(
        physical_to_logical_map_cpu=p2l, num_physical_experts=P, num_logical_experts=E,
        logical_to_all_physical_map=l2p, logical_to_all_physical_map_cpu=l2p.clone(),
        logical_to_all_physical_map_num_valid=torch.zeros((L, E), dtype=torch.int64))


def test_active_map_one_live_copy_per_expert_written_in_place():
    plan = experts.plan_for(8, 2)
    m = _metadata(plan)
    ptrs = (m.logical_to_all_physical_map.data_ptr(), m.logical_to_all_physical_map_num_valid.data_ptr())
    amap = experts.ActiveMap(m, plan, 2)
    S = plan.slots_per_rank
    act = m.logical_to_all_physical_map[:, :, 0]
    assert (m.logical_to_all_physical_map[:, :, 1:] == -1).all()
    assert (m.logical_to_all_physical_map_num_valid == 1).all()
    assert (act[0] == act[1]).all()
    for e, s in enumerate(act[0].tolist()):
        assert plan.layout.physical_to_logical[0, s] == e  # the slot holds that expert
    assert {s // S for s in act[0].tolist()} == {0, 1}, "both ranks compute some experts"
    amap.set_dead({1})
    assert all(s // S == 0 for s in m.logical_to_all_physical_map[0, :, 0].tolist())
    assert all(plan.layout.physical_to_logical[0, s] == e
               for e, s in enumerate(m.logical_to_all_physical_map[0, :, 0].tolist()))
    assert torch.equal(m.logical_to_all_physical_map, m.logical_to_all_physical_map_cpu)
    assert ptrs == (m.logical_to_all_physical_map.data_ptr(),
                    m.logical_to_all_physical_map_num_valid.data_ptr()), "storage never moves"
    assert amap.status()["uncovered"] == []


def test_active_map_refuses_a_layout_that_is_not_the_plan():
    plan = experts.plan_for(8, 2)
    m = _metadata(plan)
    m.physical_to_logical_map_cpu = m.physical_to_logical_map_cpu.flip(1)
    with pytest.raises(ConfigError, match="not the core's plan"):
        experts.ActiveMap(m, plan, 2)


def test_fill_unused_never_repeats_an_id_in_a_row():
    ids = torch.tensor([[0, -1], [-1, -1], [2, -1], [-1, 0], [3, 1]])
    out = fill_unused(ids, ids >= 0, 4)
    assert out.tolist()[4] == [3, 1] and out[0, 0] == 0 and out[2, 0] == 2 and out[3, 1] == 0
    for row in out.tolist():
        assert len(set(row)) == len(row) and all(0 <= x < 4 for x in row)
    with pytest.raises(ValueError, match="cannot stand in"):
        fill_unused(ids, ids >= 0, 1)


def test_token_view_blocks_of_one_token_round_trip():
    from resilient_ep.engines.sglang.kv import TokenView, base_rid

    torch.manual_seed(0)
    k = [torch.randn(10, 2, 4) for _ in range(3)]
    v = [torch.randn(10, 2, 4) for _ in range(3)]
    view = TokenView(k, v)
    assert view.block_size == 1 and view.block_shape == (3, 2, 2, 4)
    ids = torch.tensor([7, 2, 5])
    blocks = view.read(ids)
    assert blocks.shape == (3, 3, 2, 2, 4)
    assert torch.equal(blocks[1, 2, 0], k[2][2]) and torch.equal(blocks[0, 0, 1], v[0][7])
    dst = TokenView([torch.zeros(10, 2, 4) for _ in range(3)],
                    [torch.zeros(10, 2, 4) for _ in range(3)])
    dst.write(torch.tensor([0, 1, 9]), blocks)
    assert torch.equal(dst.k[1][9], k[1][5]) and torch.equal(dst.v[2][0], v[2][7])
    assert base_rid("abc@2") == "abc" and base_rid("abc") == "abc"
    with pytest.raises(ValueError, match="one \\[heads, dim\\] shape"):
        TokenView([torch.zeros(4, 2, 4)], [torch.zeros(4, 3, 4)])


def test_checkpoint_of_a_token_view_restores_every_token(tmp_path):
    """The core's checkpointer over SGLang-shaped buffers, through an shm-like store."""
    import time as _time

    from resilient_ep.config import KVCheckpointConfig
    from resilient_ep.engines.sglang.kv import TokenView
    from resilient_ep.kv import KVCheckpointer, StoreSpec

    k = [torch.randn(64, 2, 4) for _ in range(2)]
    v = [torch.randn(64, 2, 4) for _ in range(2)]
    cfg = KVCheckpointConfig(interval_tokens=4, store="file", max_stall_ms=0)
    spec = StoreSpec("file", 1, base_dir=str(tmp_path), durable=False)
    ckpt = KVCheckpointer(0, TokenView(k, v), cfg, spec, members=[0, 1]).start()
    tokens = list(range(100, 112))
    table = list(range(20, 32))
    assert ckpt.after_step([("r1", tokens, 11, table)]) == 1
    assert ckpt.flush(_time.monotonic() + 10)
    ckpt.shutdown()
    other = KVCheckpointer(1, TokenView([torch.zeros(64, 2, 4)] * 2, [torch.zeros(64, 2, 4)] * 2),
                           cfg, spec, members=[1]).start()
    other.restore("r1", tokens)
    assert other.flush(_time.monotonic() + 10)
    (res,) = other.restored()
    assert res.restored_tokens == 11
    got = res.blocks.reshape(11, 2, 2, 2, 4)
    assert torch.equal(got[3, 1, 0], k[1][23]) and torch.equal(got[10, 0, 1], v[0][30])
    other.shutdown()
