import pytest

from resilient_ep.config import ConfigError, ResilienceConfig

EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "resilience.yaml"


def test_defaults_are_valid_and_round_trip():
    cfg = ResilienceConfig()
    assert cfg.enabled and cfg.detector.heartbeat_interval_ms == 50.0
    assert ResilienceConfig.from_dict(cfg.to_dict()) == cfg


def test_example_yaml_loads_and_differs_from_nothing_unknown():
    cfg = ResilienceConfig.from_yaml(EXAMPLE)
    assert isinstance(cfg, ResilienceConfig)


def test_yaml_with_resilience_wrapper(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("resilience:\n  detector:\n    heartbeat_interval_ms: 20\n    heartbeat_timeout_ms: 80\n")
    cfg = ResilienceConfig.from_yaml(f)
    assert cfg.detector.heartbeat_interval_ms == 20.0 and cfg.detector.heartbeat_timeout_ms == 80.0


@pytest.mark.parametrize("data, field, fragment", [
    pytest.param({"detectr": {}}, "detectr", "unknown key", id="unknown_section"),
    pytest.param({"detector": {"interval": 3}}, "detector.interval", "unknown key", id="unknown_field"),
    pytest.param({"detector": {"heartbeat_interval_ms": "fast"}}, "detector.heartbeat_interval_ms",
                 "number", id="wrong_type"),
    pytest.param({"kv_checkpoint": {"interval_tokens": 0}}, "kv_checkpoint.interval_tokens", ">= 1",
                 id="impossible_value"),
    pytest.param({"detector": {"heartbeat_timeout_ms": 10}}, "detector.heartbeat_timeout_ms",
                 "heartbeat_interval_ms", id="cross_field"),
    pytest.param({"transport": {"address": "mpi"}}, "transport.address", "one of", id="bad_choice"),
    pytest.param({"repair": {"sources": ["shadow", "tape"]}}, "repair.sources[1]", "one of",
                 id="bad_list_item"),
    pytest.param({"enabled": "yes"}, "enabled", "true or false", id="bool_as_string"),
    pytest.param({"placement": {"redundant_slots_per_rank": 1.5}}, "placement.redundant_slots_per_rank",
                 "integer", id="float_for_int"),
])
def test_errors_name_the_field_and_value(data, field, fragment):
    with pytest.raises(ConfigError) as ei:
        ResilienceConfig.from_dict(data)
    assert ei.value.field == field
    assert fragment in str(ei.value)
    assert field in str(ei.value)


def test_overrides():
    cfg = ResilienceConfig().with_overrides(["detector.heartbeat_timeout_ms=300",
                                             "recovery.on_uncovered=fail", "enabled=false"])
    assert cfg.detector.heartbeat_timeout_ms == 300.0
    assert cfg.recovery.on_uncovered == "fail"
    assert cfg.enabled is False


@pytest.mark.parametrize("item, field", [
    pytest.param("detector.nope=1", "detector.nope", id="unknown_leaf"),
    pytest.param("nosuch.section.key=1", "nosuch", id="unknown_section"),
    pytest.param("detector", "override", id="no_equals"),
])
def test_bad_overrides(item, field):
    with pytest.raises(ConfigError) as ei:
        ResilienceConfig().with_overrides([item])
    assert ei.value.field == field


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("detector: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        ResilienceConfig.from_yaml(f)
    with pytest.raises(ConfigError, match="cannot read"):
        ResilienceConfig.from_yaml(tmp_path / "missing.yaml")


def test_keys_no_engine_implements_are_refused_by_name():
    from resilient_ep.config import changed_keys, refuse_unsupported

    cfg = ResilienceConfig.from_dict({"detector": {"heartbeat_timeout_ms": 400}})
    assert changed_keys(cfg) == {"detector.heartbeat_timeout_ms": 400}
    refuse_unsupported(cfg, "the reference runtime")  # implemented everywhere: accepted
    refuse_unsupported(ResilienceConfig(), "vllm", {"placement": "x"})  # defaults: accepted
    with pytest.raises(ConfigError) as e:
        refuse_unsupported(ResilienceConfig.from_dict({"metrics": {"timeline_path": "/tmp/t"}}),
                           "vllm")
    assert e.value.field == "metrics.timeline_path" and "vllm" in str(e.value)
    # shadows and the host backup are built on both engines
    from resilient_ep.runtime.coordinator import UNSUPPORTED

    for data in ({"shadow": {"enabled": True}}, {"repair": {"host_backup": True}}):
        refuse_unsupported(ResilienceConfig.from_dict(data), "vllm")
        refuse_unsupported(ResilienceConfig.from_dict(data), "the reference runtime", UNSUPPORTED)
    with pytest.raises(ConfigError, match="placement.fault_aware.*not supported on vllm"):
        refuse_unsupported(ResilienceConfig.from_dict({"placement": {"fault_aware": False}}),
                           "vllm", {"placement": "ring mirror"})


def test_rejoin_start_timeout_must_be_positive_and_the_reference_runtime_refuses_it():
    from resilient_ep.config import refuse_unsupported
    from resilient_ep.runtime.coordinator import UNSUPPORTED

    assert ResilienceConfig().recovery.rejoin_start_timeout_s == 300.0
    with pytest.raises(ConfigError, match="recovery.rejoin_start_timeout_s") as ei:
        ResilienceConfig().with_overrides(["recovery.rejoin_start_timeout_s=0"])
    assert "0" in str(ei.value)
    cfg = ResilienceConfig().with_overrides(["recovery.rejoin_start_timeout_s=60"])
    with pytest.raises(ConfigError, match="not supported on reference"):
        refuse_unsupported(cfg, "reference", UNSUPPORTED)
