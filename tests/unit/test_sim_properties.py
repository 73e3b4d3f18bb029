"""Invariants over random failure traces (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_ep.sim.engine import Simulation
from resilient_ep.sim.metrics import summarize
from resilient_ep.sim.scenario import Scenario

POLICIES = ["full_restart", "mask_and_repair", "shadow_kv", "resilient_ep"]

failure = st.fixed_dictionaries({
    "time_s": st.floats(0.0, 299.0, allow_nan=False),
    "rank": st.integers(0, 15),
    "kind": st.sampled_from(["crash", "hang"]),
})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(failures=st.lists(failure, min_size=0, max_size=5), seed=st.integers(0, 2**16),
       policy=st.sampled_from(POLICIES))
def test_random_traces_keep_the_books(failures, seed, policy):
    sc = Scenario.from_dict({"seed": seed, "ranks": 16, "duration_s": 300.0,
                             "failures": failures})
    inst = Simulation(sc, policy).run()
    r = summarize(sc, policy, inst)
    assert len(r.stall_s) == len(failures)
    assert all(0.0 <= s <= 300.0 for s in r.stall_s)
    assert 0.0 <= r.availability <= 1.0
    assert min(r.goodput) >= 0.0
    assert r.requests_lost >= 0 and r.recomputed_tokens >= 0
    if not failures:
        assert r.availability == 1.0 and r.requests_lost == 0
    # Nothing created or destroyed: what is not done, lost, running or queued is held by a
    # recovery still in progress (restart, KV restore), never negative.
    held = inst.requests_arrived - inst.completed - inst.requests_lost \
        - inst.requests_in_system()
    assert held >= -1e-6 * inst.requests_arrived
