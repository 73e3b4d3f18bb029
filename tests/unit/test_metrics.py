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
                        recomputed_tokens=12, kv_checkpoint_lag_tokens=4.0)
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


def test_a_fresh_instance_reports_zero_not_nothing():
    got = _samples(render(lambda: InstanceMetrics(engine="reference", ranks=2, live_ranks=2,
                                                  epoch=0)))
    e = ("engine", "reference")
    assert got[("resilient_ep_failovers_total", (e, ("kind", "crash")))] == 0
    assert got[("resilient_ep_stall_seconds_count", (e,))] == 0
    assert got[("resilient_ep_poisoned_requests_total", (e,))] == 0
