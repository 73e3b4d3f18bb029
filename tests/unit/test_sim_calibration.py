"""The shipped calibration scenarios reproduce the published figures within 20 %."""

from __future__ import annotations

from pathlib import Path

import pytest

from resilient_ep.sim.run import simulate
from resilient_ep.sim.scenario import Scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sim"
TOL = 0.20


@pytest.fixture(scope="module")
def eep():
    return simulate(Scenario.from_yaml(EXAMPLES / "eep_single_rank.yaml"))


@pytest.fixture(scope="module")
def tarragon():
    return simulate(Scenario.from_yaml(EXAMPLES / "tarragon_stall.yaml"),
                    ["full_restart", "shadow_kv"])


@pytest.mark.parametrize("policy, metric, published", [
    pytest.param("full_restart", "stall", 348.0, id="full_restart_unavailable_348s"),
    pytest.param("mask_and_repair", "stall", 11.0, id="eep_recovery_pause_11s"),
    pytest.param("mask_and_repair", "reintegration", 8.0, id="eep_reintegration_pause_8s"),
    pytest.param("mask_and_repair", "t95", 52.0, id="eep_95pct_within_52s"),
])
def test_eep_single_rank(eep, policy, metric, published):
    r = eep[policy]
    value = {"stall": r.stall_s[0], "reintegration": r.reintegration_pause_s,
             "t95": r.time_to_95pct_s}[metric]
    assert value == pytest.approx(published, rel=TOL)


def test_tarragon_stall(tarragon):
    assert tarragon["full_restart"].stall_s[0] == pytest.approx(64.0, rel=TOL)
    s = tarragon["shadow_kv"].stall_s[0]
    assert 0.3 * (1 - TOL) <= s <= 0.4 * (1 + TOL)
