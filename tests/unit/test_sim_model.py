"""Step-time, repair-time and failure-generation models."""

from __future__ import annotations

import numpy as np
import pytest

from resilient_ep.sim import repair
from resilient_ep.sim.failures import build_events
from resilient_ep.sim.metrics import time_to_fraction
from resilient_ep.sim.scenario import Scenario
from resilient_ep.sim.timing import nominal_capacity, step_time_s


def scenario(**over) -> Scenario:
    d = {"seed": 0, "ranks": 32, "duration_s": 3600.0}
    d.update(over)
    return Scenario.from_dict(d)


def test_default_step_time_is_a_wide_ep_decode_step():
    cap = nominal_capacity(scenario())
    # DeepSeek-V3, 128 sequences per rank, EP 32: published TPOT is ~50-70 ms.
    assert 0.04 < cap.step_s < 0.08
    assert cap.tokens_per_s == pytest.approx(cap.requests_per_s * 1024)


def test_step_time_grows_with_batch_imbalance_and_leaving_the_node():
    sc = scenario()
    base = dict(batch_max=64, total_tokens=64 * 32, live_ranks=32, imbalance=1.0)
    t = step_time_s(sc, **base)
    assert step_time_s(sc, **{**base, "batch_max": 128, "total_tokens": 128 * 32}) > t
    assert step_time_s(sc, **{**base, "imbalance": 2.0}) > t
    # Eight ranks in one node talk over NVLink only: faster all-to-all than across nodes.
    one_node = step_time_s(sc, **{**base, "live_ranks": 8, "total_tokens": 64 * 8})
    assert one_node < t


def test_repair_sources_are_ordered_by_cost():
    sc = scenario()
    gb = 10e9
    times = [repair.transfer_s(sc, s, gb) for s in ("shadow", "peer", "host", "remote", "disk")]
    assert times == sorted(times) and len(set(times)) == 5
    # Storage is shared by the node's loaders; links are per GPU.
    assert repair.transfer_s(sc, "disk", gb, loaders_per_node=8) - sc.hardware.transfer_setup_s \
        == pytest.approx(8 * (times[4] - sc.hardware.transfer_setup_s))
    assert repair.transfer_s(sc, "host", gb, loaders_per_node=8) == times[2]
    assert repair.experts_repair_s(sc, "host", 0, 31) == 0.0


def test_generated_failures_are_deterministic_and_node_correlated():
    sc = scenario(duration_s=36000.0,
                  generated={"rank_mtbf_h": 500, "node_mtbf_h": 5, "node_repair_s": 600})
    a = build_events(sc, np.random.default_rng([0, 2]))
    b = build_events(sc, np.random.default_rng([0, 2]))
    c = build_events(sc, np.random.default_rng([1, 2]))
    assert a == b and a != c
    node = [e for e in a if e.origin == "generated-node"]
    assert node, "5 h node MTBF over 4 nodes for ten hours should fail a node"
    first = node[0]
    group = [e for e in node if e.time_s == first.time_s]
    assert sorted(e.rank for e in group) == list(range(first.rank, first.rank + 8))
    assert all(e.hardware_back_s == e.time_s + 600 for e in group)
    # No rank fails again while its hardware is down.
    down: dict[int, float] = {}
    for e in a:
        assert e.time_s >= down.get(e.rank, -1.0)
        down[e.rank] = e.hardware_back_s


def test_time_to_95_needs_sustained_recovery():
    g = np.full(100, 100.0)
    g[10:20] = 0.0       # outage
    g[20:23] = 100.0     # brief recovery
    g[23:30] = 50.0      # relapse
    t = time_to_fraction(g, 1.0, 10.0, 100.0, smoothing_s=1, sustain_s=10)
    assert t == pytest.approx(20.0)
    assert time_to_fraction(g, 1.0, 10.0, 100.0, smoothing_s=1, sustain_s=3) == \
        pytest.approx(10.0)
    g[30:] = 90.0
    assert time_to_fraction(g, 1.0, 10.0, 100.0, smoothing_s=1, sustain_s=10) is None
