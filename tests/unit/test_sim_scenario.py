"""Scenario files: defaults, and clear errors that name the dotted key."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from resilient_ep.sim.failures import build_events
from resilient_ep.sim.scenario import Scenario, ScenarioError

MINIMAL = """
seed: 1
ranks: 32
duration_s: 300
failures: [{time_s: 100, rank: 5, kind: crash}]
"""


def load(tmp_path, text: str) -> Scenario:
    p = tmp_path / "s.yaml"
    p.write_text(textwrap.dedent(text))
    return Scenario.from_yaml(p)


def test_minimal_scenario_gets_deepseek_v3_on_h100_defaults(tmp_path):
    sc = load(tmp_path, MINIMAL)
    assert sc.name == "s"
    assert (sc.model.moe_layers, sc.model.num_experts, sc.model.experts_per_token) == (58, 256, 8)
    assert sc.hardware.gpus_per_node == 8 and sc.nodes == 4
    assert sc.slots_per_rank == 256 // 32 + 1
    assert sc.failures[0].kind == "crash" and sc.failures[0].rank == 5
    assert sc.policies.enabled() == ["full_restart", "mask_and_repair", "shadow_kv",
                                     "resilient_ep"]
    # Round trip through a plain dict.
    assert Scenario.from_dict(sc.to_dict()) == sc


@pytest.mark.parametrize("text, key, words", [
    pytest.param(MINIMAL + "colour: red\n", "colour", "unknown key", id="unknown_top_level"),
    pytest.param(MINIMAL + "model: {experts: 8}\n", "model.experts", "unknown key",
                 id="unknown_nested"),
    pytest.param(MINIMAL + "policies: {resilient_ep: {shadows: 2}}\n",
                 "policies.resilient_ep.shadows", "unknown key", id="unknown_policy_key"),
    pytest.param(MINIMAL + "policies: {tarragon: {}}\n", "policies.tarragon", "unknown key",
                 id="unknown_policy"),
    pytest.param("seed: 1\nranks: 8\nduration_s: 10\nfailures: [{time_s: 1, rank: 0, node: 1}]\n",
                 "failures[0].node", "unknown key", id="unknown_failure_key"),
    pytest.param("seed: 1\nranks: '16'\nduration_s: 10\n", "ranks", "must be an integer",
                 id="wrong_type"),
    pytest.param("ranks: 16\nduration_s: 10\n", "seed", "is required", id="missing_seed"),
    pytest.param("seed: 1\nranks: 16\nduration_s: 10\nfailures: [{time_s: 1, rank: 16}]\n",
                 "failures[0].rank", "must be in [0, ranks=16)", id="rank_out_of_range"),
    pytest.param("seed: 1\nranks: 16\nduration_s: 10\nfailures: [{time_s: 10, rank: 1}]\n",
                 "failures[0].time_s", "duration_s", id="time_past_end"),
    pytest.param("seed: 1\nranks: 16\nduration_s: 10\nfailures: [{time_s: 1, rank: 1, "
                 "kind: explode}]\n", "failures[0].kind", "must be one of", id="bad_kind"),
    pytest.param("seed: 1\nranks: 16\nduration_s: 10\nfailures: [{rank: 1}]\n",
                 "failures[0].time_s", "is required", id="failure_without_time"),
    pytest.param(MINIMAL + "workload: {load_factor: -1}\n", "workload.load_factor",
                 "must be > 0", id="negative_load"),
    pytest.param("seed: 1\nranks: 12\nduration_s: 10\n", "ranks", "multiple of",
                 id="ranks_not_whole_nodes"),
    pytest.param(MINIMAL + "policies: {full_restart: {enabled: false}, mask_and_repair: "
                 "{enabled: false}, shadow_kv: {enabled: false}, resilient_ep: "
                 "{enabled: false}}\n", "policies", "at least one", id="all_disabled"),
    pytest.param(MINIMAL + "policies: {full_restart: {weights_source: tape}}\n",
                 "policies.full_restart.weights_source", "must be one of", id="bad_source"),
])
def test_bad_scenarios_name_the_key(tmp_path, text, key, words):
    with pytest.raises(ScenarioError) as e:
        load(tmp_path, text)
    assert e.value.field == key
    assert words in str(e.value)
    assert str(e.value).startswith(f"{key}:")


@pytest.mark.parametrize("text, words", [
    pytest.param("", "empty", id="empty"),
    pytest.param("- 1\n- 2\n", "mapping", id="list"),
    pytest.param("seed: [1\n", "invalid YAML", id="broken_yaml"),
])
def test_unreadable_files(tmp_path, text, words):
    with pytest.raises(ScenarioError, match=words):
        load(tmp_path, text)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read"):
        Scenario.from_yaml(tmp_path / "nope.yaml")


def test_recover_ends_the_latest_earlier_failure(tmp_path):
    sc = load(tmp_path, """
        seed: 1
        ranks: 16
        duration_s: 900
        failures:
          - {time_s: 500, rank: 3, kind: recover}
          - {time_s: 100, rank: 3, kind: crash}
          - {time_s: 200, rank: 4, kind: hang}
          - {time_s: 50, rank: 3, kind: hang}
        """)
    evs = build_events(sc, np.random.default_rng(0))
    # The hang at 50 s is a software fault (relaunch at once); the crash at 100 s keeps the
    # GPU down until the recover at 500 s.
    assert [(e.time_s, e.rank, e.kind, e.hardware_back_s) for e in evs] == [
        (50.0, 3, "hang", 50.0), (100.0, 3, "crash", 500.0), (200.0, 4, "hang", 200.0)]


@pytest.mark.parametrize("failures, key, words", [
    pytest.param("[{time_s: 50, rank: 2, kind: recover}]", "failures[0]", "no earlier crash",
                 id="recover_without_failure"),
])
def test_inconsistent_traces(tmp_path, failures, key, words):
    sc = load(tmp_path, f"seed: 1\nranks: 16\nduration_s: 100\nfailures: {failures}\n")
    with pytest.raises(ScenarioError) as e:
        build_events(sc, np.random.default_rng(0))
    assert e.value.field == key and words in str(e.value)


def _dotted_keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_scenario_key_is_documented():
    from pathlib import Path

    from resilient_ep.sim.scenario import FailureSpec

    doc = (Path(__file__).resolve().parents[2] / "docs" / "simulator.md").read_text()
    keys = list(_dotted_keys(Scenario)) + [f"failures[].{k}" for k in _dotted_keys(FailureSpec)]
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/simulator.md lacks {missing}"


def test_shipped_examples_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[2] / "examples" / "sim").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        Scenario.from_yaml(f)
