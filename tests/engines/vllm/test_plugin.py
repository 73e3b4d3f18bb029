"""The plugin without starting an engine: registration, flags, YAML, additional-config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resilient_ep.config import ConfigError

pytestmark = pytest.mark.engine


def _serve_parser():
    from resilient_ep.engines.vllm.plugin import register

    register()
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def _engine_args(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _serve_parser().parse_args(argv)
    return args, AsyncEngineArgs.from_cli_args(args)


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("resilient_ep") == "resilient_ep.engines.vllm.plugin:register"


def test_register_is_idempotent_and_cheap_in_a_vllm_process():
    code = textwrap.dedent("""
        import json, sys, time
        import vllm.v1.worker.worker_base  # what a worker has imported when it loads plugins
        from vllm.engine.arg_utils import EngineArgs
        before = EngineArgs.__dict__["create_engine_config"]
        from vllm.plugins import load_general_plugins
        t = time.perf_counter(); load_general_plugins(); first = time.perf_counter() - t
        wrapped = EngineArgs.__dict__["create_engine_config"]
        from resilient_ep.engines.vllm.plugin import register
        t = time.perf_counter(); register(); register(); again = time.perf_counter() - t
        print(json.dumps({"first_s": first, "again_s": again,
                          "wrapped": wrapped is not before,
                          "stable": EngineArgs.__dict__["create_engine_config"] is wrapped,
                          "moe_imported": any(m.startswith("vllm.model_executor.layers.fused_moe")
                                              for m in sys.modules)}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "RESILIENT_EP_VLLM_ACTIVE": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["wrapped"] and r["stable"], r
    assert not r["moe_imported"], "register() must not import model code when resilience is off"
    assert r["first_s"] < 2.0 and r["again_s"] < 0.01, r


def test_flags_show_in_serve_parser():
    help_text = _serve_parser().format_help()
    for flag in ("--enable-resilience", "--resilience-config", "--resilience-set"):
        assert flag in help_text


def test_enable_flag(tiny_model):
    from resilient_ep.engines.vllm.cli_args import STATUS_MIDDLEWARE

    args, ea = _engine_args(["--model", str(tiny_model), "--enable-resilience"])
    section = dict(ea.additional_config["resilience"])
    assert section.pop("instance") and section == {"enabled": True}
    assert args.middleware == [STATUS_MIDDLEWARE]
    ea2 = type(ea).from_cli_args(args)  # a second API server process parses again
    assert args.middleware == [STATUS_MIDDLEWARE] and ea2.additional_config == ea.additional_config


def test_yaml_and_overrides(tiny_model, tmp_path):
    from resilient_ep.engines.vllm.config import resilience_config

    path = tmp_path / "res.yaml"
    path.write_text("resilience:\n  detector:\n    heartbeat_interval_ms: 25\n"
                    "  placement:\n    redundant_slots_per_rank: 2\n")
    _, ea = _engine_args(["--model", str(tiny_model), "--resilience-config", str(path),
                          "--resilience-set", "detector.heartbeat_timeout_ms=100",
                          "--resilience-set", "kv_checkpoint.interval_tokens=8"])
    section = ea.additional_config["resilience"]
    assert section["config_file"] == str(path) and section["enabled"] is True
    cfg = resilience_config(ea.additional_config)
    assert cfg.detector.heartbeat_interval_ms == 25.0
    assert cfg.detector.heartbeat_timeout_ms == 100.0
    assert cfg.placement.redundant_slots_per_rank == 2
    assert cfg.kv_checkpoint.interval_tokens == 8


def test_every_api_server_rebuilds_the_same_resilience_config(tiny_model):
    """vLLM's launcher hands its parsed ``args`` to each API server process, which builds its
    engine args again: the flags must survive that, with one instance id for all."""
    import copy

    from vllm.engine.arg_utils import AsyncEngineArgs

    args, ea = _engine_args(["--model", str(tiny_model), "--enable-resilience",
                             "--resilience-set", "detector.heartbeat_timeout_ms=900"])
    instance = ea.additional_config["resilience"]["instance"]
    assert instance and args.additional_config == ea.additional_config
    again = AsyncEngineArgs.from_cli_args(copy.deepcopy(args))  # what an API server does
    assert again.additional_config["resilience"]["instance"] == instance
    assert again.additional_config["resilience"]["overrides"] == [
        "detector.heartbeat_timeout_ms=900"]


def test_additional_config_json(tiny_model):
    from resilient_ep.engines.vllm.cli_args import STATUS_MIDDLEWARE
    from resilient_ep.engines.vllm.config import is_enabled, resilience_config

    args, ea = _engine_args(["--model", str(tiny_model), "--additional-config",
                             json.dumps({"resilience": {"transport": {"step_timeout_ms": 500}},
                                         "other_plugin": 1})])
    assert is_enabled(ea.additional_config) and ea.additional_config["other_plugin"] == 1
    assert resilience_config(ea.additional_config).transport.step_timeout_ms == 500.0
    assert STATUS_MIDDLEWARE in args.middleware
    _, off = _engine_args(["--model", str(tiny_model), "--additional-config",
                           json.dumps({"resilience": {"enabled": False}})])
    assert not is_enabled(off.additional_config)


def test_bad_value_fails_at_config_time_naming_the_field(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(str(tiny_model), dtype="float32", max_model_len=512,
                    additional_config={"resilience": {"detector": {"heartbeat_interval_ms": -5}}})
    with pytest.raises(ConfigError) as e:
        ea.create_engine_config()
    assert e.value.field == "detector.heartbeat_interval_ms"
    ea = EngineArgs(str(tiny_model), dtype="float32", max_model_len=512,
                    additional_config={"resilience": {"detectr": {}}})
    with pytest.raises(ConfigError, match="detectr"):
        ea.create_engine_config()


def test_a_setting_vllm_does_not_implement_is_refused_naming_key_and_engine(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    for key, value in (("recovery.max_failures", 2), ("transport.address", "tcp"),
                       ("kv_checkpoint.max_stall_ms", 5)):
        ea = EngineArgs(str(tiny_model), dtype="float32", max_model_len=512,
                        additional_config={"resilience": {"overrides": [f"{key}={value}"]}})
        with pytest.raises(ConfigError) as e:
            ea.create_engine_config()
        assert e.value.field == key and "not supported on vllm" in str(e.value), e.value


def test_eplb_redundant_experts_become_the_cores_budget(monkeypatch):
    """``--eplb-config '{"num_redundant_experts": N}'`` without ``--enable-eplb`` (refused by
    vLLM off CUDA) is placed by the core: ceil(N / EP size) slots per rank, vLLM's field 0."""
    from types import SimpleNamespace

    from vllm.config import EPLBConfig

    from resilient_ep.engines.vllm import cli_args

    def args(n, placement=None):
        return SimpleNamespace(eplb_config=EPLBConfig(num_redundant_experts=n), enable_eplb=False,
                               data_parallel_size=4, tensor_parallel_size=1,
                               enable_expert_parallel=True,
                               additional_config={"resilience": {"placement": placement or {}}})

    ea = args(6)
    cli_args._translate_redundant_experts(ea)
    assert ea.additional_config["resilience"]["placement"]["redundant_slots_per_rank"] == 2
    assert ea.eplb_config.num_redundant_experts == 0
    ea = args(4, {"redundant_slots_per_rank": 1})
    with pytest.raises(ConfigError) as e:
        cli_args._translate_redundant_experts(ea)
    assert e.value.field == "placement.redundant_slots_per_rank"
    ea = args(0)
    cli_args._translate_redundant_experts(ea)
    assert ea.additional_config["resilience"]["placement"] == {}


def test_without_flags_nothing_changes(tiny_model):
    """No switch: no flag effect, no middleware, no worker extension, no env, no patch."""
    code = textwrap.dedent(f"""
        import json, os
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.engine.arg_utils import AsyncEngineArgs
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", {str(tiny_model)!r},
            "--dtype", "float32", "--max-model-len", "512", "--additional-config", '{{"x": 1}}'])
        ea = AsyncEngineArgs.from_cli_args(args)
        cfg = ea.create_engine_config()
        from resilient_ep.engines.vllm import patches, plugin
        print(json.dumps({{"middleware": args.middleware,
            "additional_config": cfg.additional_config,
            "worker_extension_cls": cfg.parallel_config.worker_extension_cls,
            "env": os.environ.get("RESILIENT_EP_VLLM_ACTIVE"),
            "active": plugin.is_active(), "patched": patches.applied_patches()}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "RESILIENT_EP_VLLM_ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"middleware": [], "additional_config": {"x": 1}, "worker_extension_cls": "",
                 "env": None, "active": False, "patched": []}, r


def test_with_resilience_config_reaches_the_engine_config(tiny_model):
    from resilient_ep.engines.vllm.cli_args import WORKER_EXTENSION
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(str(tiny_model), dtype="float32", max_model_len=512,
                    additional_config={"resilience": {"overrides": ["kv_checkpoint.interval_tokens=32"]}})
    cfg = ea.create_engine_config()
    section = cfg.additional_config["resilience"]
    assert section["kv_checkpoint"]["interval_tokens"] == 32 and "overrides" not in section
    assert cfg.parallel_config.worker_extension_cls == WORKER_EXTENSION
    assert os.environ.get("RESILIENT_EP_VLLM_ACTIVE") == "1"
    os.environ.pop("RESILIENT_EP_VLLM_ACTIVE")
