"""The four policies on small scenarios: behaviour each one must show."""

from __future__ import annotations

import numpy as np
import pytest

from resilient_ep.layout import ExpertLayout
from resilient_ep.sim import repair
from resilient_ep.sim.engine import Simulation
from resilient_ep.sim.run import simulate
from resilient_ep.sim.scenario import Scenario

POLICIES = ["full_restart", "mask_and_repair", "shadow_kv", "resilient_ep"]


def scenario(**over) -> Scenario:
    d = {"seed": 5, "ranks": 16, "duration_s": 400.0,
         "failures": [{"time_s": 100.0, "rank": 3, "kind": "crash"}]}
    d.update(over)
    return Scenario.from_dict(d)


@pytest.fixture(scope="module")
def one_crash():
    return simulate(scenario(duration_s=700.0))


def test_same_seed_same_result_other_seed_other_result():
    a = simulate(scenario())
    b = simulate(scenario())
    c = simulate(scenario(seed=6))
    for p in POLICIES:
        assert a[p].to_dict() == b[p].to_dict()
    assert a["resilient_ep"].goodput != c["resilient_ep"].goodput


def test_without_failures_every_policy_serves_the_same(tmp_path):
    res = simulate(scenario(failures=[]))
    ref = res["full_restart"]
    assert ref.availability == 1.0 and ref.requests_lost == 0 and ref.stall_s == []
    for p in POLICIES:
        assert res[p].time_to_95pct_s is None
        assert res[p].recomputed_tokens == 0
    for p in ["mask_and_repair", "shadow_kv"]:
        assert res[p].goodput == ref.goodput
    # resilient_ep serves on the core's fault-aware layout: within 1 % of load-only balance.
    assert res["resilient_ep"].mean_goodput == pytest.approx(ref.mean_goodput, rel=0.01)


def test_single_crash_orders_the_policies(one_crash):
    r = one_crash
    stall = {p: r[p].stall_s[0] for p in POLICIES}
    assert stall["full_restart"] > 100 > stall["mask_and_repair"] > 5 > stall["resilient_ep"]
    assert stall["shadow_kv"] < 5
    # Availability is the time not stalled.
    assert r["full_restart"].availability == pytest.approx(1 - stall["full_restart"] / 700,
                                                           abs=0.05)
    # EEP loses the dead rank's requests; KV checkpoints keep them; restart re-prefills all.
    assert r["mask_and_repair"].requests_lost > 0
    assert r["shadow_kv"].requests_lost == r["resilient_ep"].requests_lost == 0
    assert r["full_restart"].recomputed_tokens > 100 * r["resilient_ep"].recomputed_tokens > 0
    # EEP pays a reintegration pause, resilient_ep a table flip.
    assert r["mask_and_repair"].reintegration_pause_s == pytest.approx(8.0)
    assert r["resilient_ep"].reintegration_pause_s < 0.1
    for p in POLICIES:
        assert r[p].time_to_95pct_s is not None and r[p].time_to_95pct_s >= 0
    assert r["full_restart"].time_to_95pct_s > r["mask_and_repair"].time_to_95pct_s


def test_hang_is_detected_by_heartbeat_timeout():
    crash = simulate(scenario(), ["shadow_kv"])["shadow_kv"].stall_s[0]
    sc = scenario(failures=[{"time_s": 100.0, "rank": 3, "kind": "hang"}],
                  detection={"heartbeat_timeout_s": 6.0})
    hang = simulate(sc, ["shadow_kv"])["shadow_kv"].stall_s[0]
    assert hang >= 6.0 > crash


def test_full_restart_waits_for_the_broken_gpu_and_elastic_policies_do_not():
    sc = scenario(duration_s=800.0,
                  failures=[{"time_s": 100.0, "rank": 3, "kind": "crash"},
                            {"time_s": 350.0, "rank": 3, "kind": "recover"}])
    r = simulate(sc)
    assert r["full_restart"].stall_s[0] >= 250.0
    assert r["resilient_ep"].stall_s[0] < 5.0
    # EEP relaunches the rank only once its GPU is back: the reintegration pause starts after
    # 350 s + relaunch + weight load + graph capture, and the survivors serve until then.
    rs = sc.restart
    start = 350.0 + rs.process_start_s + repair.rank_weights_s(sc, "disk") + rs.graph_capture_s
    g = np.array(r["mask_and_repair"].goodput)
    i = int(start)
    assert (g[120:i - 1] > 0).all()
    assert (g[i + 1:i + 7] == 0).all() and (g[i + 10:i + 20] > 0).all()


def test_node_failure_beats_neighbour_shadows_but_not_fault_aware_placement():
    # Eight ranks of node 0 crash at once: shadow_kv's shadows sit in the same node and the
    # lost experts come from host memory; the fault-aware layout (same residual memory) kept
    # replicas on other nodes, so it copies fewer weights and stalls no longer.
    fails = [{"time_s": 100.0, "rank": r, "kind": "crash"} for r in range(8)]
    sc = scenario(ranks=32, failures=fails, duration_s=300.0,
                  policies={"full_restart": {"enabled": False},
                            "mask_and_repair": {"enabled": False}})
    r = simulate(sc)
    single = simulate(sc.__class__.from_dict({**sc.to_dict(), "failures": fails[:1]}))
    assert len(r["shadow_kv"].stall_s) == len(r["resilient_ep"].stall_s) == 8
    # shadow_kv: the node took the shadows with it, the host copy lengthens the stall.
    assert max(r["shadow_kv"].stall_s) > single["shadow_kv"].stall_s[0] + 0.1
    # resilient_ep: the core says the layout survives any node loss, and replan copies nothing.
    d = r["resilient_ep"].details
    assert d["node_loss_survival"] == 1.0 and d["expert_weight_copies"] == 0
    assert max(r["resilient_ep"].stall_s) < max(r["shadow_kv"].stall_s)


def test_resilient_ep_runs_on_the_core_layout_and_stops_when_replan_cannot_cover():
    sim = Simulation(scenario(), "resilient_ep")
    sim.policy.setup()
    assert isinstance(sim.policy.layout, ExpertLayout)
    assert sim.policy.layout.num_ranks == 16
    # 8 ranks x 32 slots hold 256 experts with no spare: after one loss 224 slots remain and
    # replan reports unrepairable experts. ``wait`` stays down until the rank rejoins;
    # ``degrade`` (the project's default) serves at once, inexact until then.
    rs = scenario().restart
    rejoin_s = rs.process_start_s + rs.graph_capture_s

    def run(shadows: int, on_uncovered: str):
        sc = scenario(ranks=8, model={"redundant_slots_per_rank": 0},
                      policies={"resilient_ep": {"shadow_slots_per_rank": shadows,
                                                 "on_uncovered": on_uncovered}})
        return simulate(sc, ["resilient_ep"])["resilient_ep"]

    wait = run(0, "wait")
    assert wait.stall_s[0] >= rejoin_s
    assert wait.details["unservable_failures"] == 1 and "inexact_s" not in wait.details
    degrade = run(0, "degrade")
    assert degrade.stall_s[0] < 2.0
    assert degrade.details["inexact_s"] >= rejoin_s
    # With room in residual memory every lost expert gets a slot: brief copies, no waiting.
    roomy = run(8, "wait")
    assert roomy.stall_s[0] < 2.0 and "unservable_failures" not in roomy.details


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_is_accounted_for(policy):
    """Arrived = completed + lost + still running or queued, once recovery is over."""
    sc = scenario(duration_s=900.0,
                  failures=[{"time_s": 100.0, "rank": 3, "kind": "crash"},
                            {"time_s": 130.0, "rank": 9, "kind": "hang"}],
                  workload={"request_timeout_s": 30.0})
    inst = Simulation(sc, policy).run()
    assert inst.requests_arrived > 0
    assert inst.completed + inst.requests_lost + inst.requests_in_system() == pytest.approx(
        inst.requests_arrived, rel=1e-9)
