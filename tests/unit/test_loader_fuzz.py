"""The configuration and scenario loaders under random input (hypothesis, bounded): whatever
the mapping, a loader returns a valid object or raises its own error naming a field (the
dotted key and the value); no other exception escapes, and a valid document survives a round
trip."""

import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_ep.config import ConfigError, ResilienceConfig
from resilient_ep.sim.scenario import Scenario, ScenarioError

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    yield prefix


def _mutate(base: dict, data) -> dict:
    """Replace a few nodes of a valid document (any depth) with random values, or add keys."""
    doc = yaml.safe_load(yaml.safe_dump(base))
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths))
        node = doc
        for k in path[:-1]:
            if not isinstance(node, dict) or k not in node:
                break
            node = node[k]
        else:
            if isinstance(node, dict):
                if data.draw(st.booleans()):
                    node[path[-1]] = data.draw(values)
                else:
                    node[data.draw(st.text(min_size=1, max_size=8))] = data.draw(values)
    return doc


def _field_error(e: Exception, cls) -> None:
    assert isinstance(e, cls), f"{type(e).__name__} escaped: {e}"
    assert getattr(e, "field", None), e
    assert str(e)


@FUZZ
@given(st.data())
def test_config_loader_takes_anything(data):
    doc = _mutate(ResilienceConfig().to_dict(), data)
    try:
        cfg = ResilienceConfig.from_dict(doc)
    except Exception as e:  # noqa: BLE001 - the property is about which exception
        _field_error(e, ConfigError)
        return
    assert ResilienceConfig.from_dict(cfg.to_dict()) == cfg


@FUZZ
@given(st.lists(st.text(max_size=40), max_size=4))
def test_config_overrides_take_anything(items):
    try:
        ResilienceConfig().with_overrides(items)
    except Exception as e:  # noqa: BLE001
        _field_error(e, ConfigError)


SCENARIO = yaml.safe_load(next((ROOT / "examples" / "sim").glob("*.yaml")).read_text())


@FUZZ
@given(st.data())
def test_scenario_loader_takes_anything(data):
    doc = _mutate(SCENARIO, data)
    try:
        sc = Scenario.from_dict(doc)
    except Exception as e:  # noqa: BLE001
        _field_error(e, ScenarioError)
        return
    assert sc.ranks >= 1 and math.isfinite(sc.duration_s)


@FUZZ
@given(values, st.sampled_from([(ResilienceConfig, ConfigError), (Scenario, ScenarioError)]))
def test_loaders_take_any_top_level(doc, loader):
    cls, error = loader
    try:
        cls.from_dict(doc)
    except Exception as e:  # noqa: BLE001
        _field_error(e, error)
