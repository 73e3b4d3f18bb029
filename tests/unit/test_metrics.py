"""resilient_ep.metrics: every documented metric is exposed, histograms bucket what they
are given, labels carry the engine and the reasons."""

from prometheus_client.parser import text_string_to_metric_families

from resilient_ep.metrics import NAMES, InstanceMetrics, render


def _samples(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_every_metric_is_exposed_and_parses():
    m = InstanceMetrics(engine="vllm", ranks=4, live_ranks=3, epoch=2, uncovered_experts=1,
                        failovers={"crash": 1, "hang": 1}, detection_s=[0.004, 0.7],
                        stall_s=[0.09, 0.2], rejected={("liveness", "auth"): 5,
                                                       ("group", "stale"): 2},
                        loop_restarts={"monitor": 1}, requests_migrated=7,
                        poisoned_requests=1, kv_restores=3, restored_tokens=300,
                        recomputed_tokens=12, kv_checkpoint_lag_tokens=4.0,
                        repair_copies={"host": 2}, repair_bytes={"host": 4096},
                        repairing_experts=1, active_shadows=3, expert_waits=5)
    got = _samples(render(m))
    names = {n for n, _ in got}
    for n in NAMES:
        assert any(x == f"resilient_ep_{n}" or x.startswith(f"resilient_ep_{n}_") for x in names), n
    e = ("engine", "vllm")
    assert got[("resilient_ep_live_ranks", (e,))] == 3
    assert got[("resilient_ep_failovers_total", (e, ("kind", "hang")))] == 1
    assert got[("resilient_ep_rejected_messages_total",
                (("component", "liveness"), e, ("reason", "auth")))] == 5
    assert got[("resilient_ep_detection_seconds_bucket", (e, ("le", "0.005")))] == 1
    assert got[("resilient_ep_detection_seconds_bucket", (e, ("le", "0.5")))] == 1
    assert got[("resilient_ep_detection_seconds_bucket", (e, ("le", "1.0")))] == 2
    assert got[("resilient_ep_detection_seconds_count", (e,))] == 2
    assert abs(got[("resilient_ep_stall_seconds_sum", (e,))] - 0.29) < 1e-9
    assert got[("resilient_ep_restored_tokens_total", (e,))] == 300
    assert got[("resilient_ep_repair_copies_total", (e, ("source", "host")))] == 2
    assert got[("resilient_ep_repair_copies_total", (e, ("source", "disk")))] == 0
    assert got[("resilient_ep_active_shadows", (e,))] == 3
    assert got[("resilient_ep_expert_waits_total", (e,))] == 5


def test_a_fresh_instance_reports_zero_not_nothing():
    got = _samples(render(lambda: InstanceMetrics(engine="reference", ranks=2, live_ranks=2,
                                                  epoch=0)))
    e = ("engine", "reference")
    assert got[("resilient_ep_failovers_total", (e, ("kind", "crash")))] == 0
    assert got[("resilient_ep_stall_seconds_count", (e,))] == 0
    assert got[("resilient_ep_poisoned_requests_total", (e,))] == 0


def test_vllm_metrics_from_a_status_document():
    from resilient_ep.engines.vllm.metrics import from_status

    status = {"epoch": 1, "uncovered_experts": [[0, 3]],
              "ranks": [{"state": "live"}, {"state": "dead"}],
              "failovers": [{"dp_rank": 1, "cause": "exit", "injected_monotonic": 10.0,
                             "detected_monotonic": 10.02, "first_output_monotonic": 10.3,
                             "readmitted": 4, "readmitted_tokens": 500}],
              "poisoned_requests": [{"request_id": "x"}],
              "liveness": {"dropped": {"auth": 3}, "restarts": 1},
              "counters": [{"dropped": {"stale": 2}, "workers": [
                  {"dropped": {"fields": 1}, "kv": {"loads": 3, "external_hit_tokens": 448}}]}],
              "experts": {"repair": {"disk": {"copies": 4, "bytes": 786432}},
                          "repairing": [6], "active_shadows": 2, "counters": {"waits": 3}}}
    m = from_status(status)
    assert m.repair_copies == {"disk": 4} and m.repair_bytes == {"disk": 786432}
    assert (m.repairing_experts, m.active_shadows, m.expert_waits) == (1, 2, 3)
    assert (m.ranks, m.live_ranks, m.epoch, m.uncovered_experts) == (2, 1, 1, 1)
    assert m.failovers == {"crash": 1} and m.requests_migrated == 4 and m.poisoned_requests == 1
    assert abs(m.detection_s[0] - 0.02) < 1e-9 and abs(m.stall_s[0] - 0.3) < 1e-9
    assert m.rejected == {("liveness", "auth"): 3, ("engine-group", "stale"): 2,
                          ("worker-group", "fields"): 1}
    assert (m.kv_restores, m.restored_tokens, m.recomputed_tokens) == (3, 448, 52)
    assert m.loop_restarts == {"liveness": 1}
    assert b"kv_checkpoint_lag" not in render(m)  # unknown on vLLM: not exposed as 0
    # A hang nobody injected: no detection observed, the stall counted from detection.
    m = from_status({"ranks": [], "failovers": [{"cause": "hang", "detected_monotonic": 5.0,
                                                 "injected_monotonic": None,
                                                 "first_output_monotonic": 5.5}]})
    assert m.failovers == {"hang": 1} and m.detection_s == [] and m.stall_s == [0.5]
