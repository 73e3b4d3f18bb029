"""Prometheus metrics of a resilient instance, the same names on every engine.

An engine adapter fills an :class:`InstanceMetrics` from what it already keeps (the reference
runtime's coordinator, vLLM's front end and its engines' counters) and :func:`render` turns it
into Prometheus' text format, to be served on ``/metrics`` (the reference server) or appended
to an engine's own ``/metrics`` (vLLM). The values are read at scrape time: nothing is counted
twice, no process keeps a second copy of the numbers.

=========================================  =========  ===============================================
name                                       type       what
=========================================  =========  ===============================================
``resilient_ep_ranks``                     gauge      ranks of the instance
``resilient_ep_live_ranks``                gauge      ranks live now
``resilient_ep_membership_epoch``          gauge      membership epoch (one bump per change)
``resilient_ep_uncovered_experts``         gauge      (layer, expert) pairs without a live replica
``resilient_ep_failovers_total``           counter    ranks lost and recovered from, by ``kind``
                                                      (``crash`` / ``hang``)
``resilient_ep_detection_seconds``         histogram  failure to detection (injected failures: from
                                                      the injection; otherwise from the rank's last
                                                      sign of life)
``resilient_ep_stall_seconds``             histogram  failure until every survivor has stepped again
``resilient_ep_rejected_messages_total``   counter    control-plane messages dropped, by
                                                      ``component`` and ``reason`` (``auth``,
                                                      ``header``, ``version``, ``tensor``,
                                                      ``non_member``, ``stale_epoch``, ``content``...)
``resilient_ep_loop_restarts_total``       counter    receive loops restarted after an error, by
                                                      ``component``
``resilient_ep_requests_migrated_total``   counter    requests moved off a lost rank
``resilient_ep_poisoned_requests_total``   counter    requests failed by ``recovery.max_request_failures``
``resilient_ep_kv_restores_total``         counter    migrated requests resumed from a KV checkpoint
``resilient_ep_restored_tokens_total``     counter    tokens whose KV came from a checkpoint
``resilient_ep_recomputed_tokens_total``   counter    tokens recomputed after a migration
``resilient_ep_kv_checkpoint_lag_tokens``  gauge      largest checkpoint lag of a live rank, tokens
``resilient_ep_repair_copies_total``       counter    expert weight copies that restored coverage,
                                                      by ``source`` (``host``, ``disk``, ...)
``resilient_ep_repair_bytes_total``        counter    bytes those copies moved, by ``source``
``resilient_ep_repairing_experts``         gauge      experts whose copy is on its way
``resilient_ep_active_shadows``            gauge      shadow slots serving an expert now
``resilient_ep_expert_waits_total``        counter    MoE passes that waited for a copy
                                                      (``recovery.on_uncovered: wait``)
=========================================  =========  ===============================================

Every metric carries an ``engine`` label (``reference`` or ``vllm``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = ["InstanceMetrics", "render", "CONTENT_TYPE", "BUCKETS_S", "NAMES"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Histogram buckets (seconds) of detection and stall times: from a crash seen by a dropped
connection (milliseconds) to a full restart (a minute)."""


@dataclass
class InstanceMetrics:
    engine: str
    ranks: int
    live_ranks: int
    epoch: int
    uncovered_experts: int = 0
    failovers: dict[str, int] = field(default_factory=dict)
    detection_s: list[float] = field(default_factory=list)
    stall_s: list[float] = field(default_factory=list)
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)
    loop_restarts: dict[str, int] = field(default_factory=dict)
    requests_migrated: int = 0
    poisoned_requests: int = 0
    kv_restores: int = 0
    restored_tokens: int = 0
    recomputed_tokens: int = 0
    kv_checkpoint_lag_tokens: float | None = 0.0
    """None where the engine does not know it (not exposed then)."""
    repair_copies: dict[str, int] = field(default_factory=dict)
    repair_bytes: dict[str, int] = field(default_factory=dict)
    repairing_experts: int = 0
    active_shadows: int = 0
    expert_waits: int = 0


def _families(m: InstanceMetrics):
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

    eng = [m.engine]

    def gauge(name, doc, value):
        g = GaugeMetricFamily(f"resilient_ep_{name}", doc, labels=["engine"])
        g.add_metric(eng, value)
        return g

    def counter(name, doc, value):
        c = CounterMetricFamily(f"resilient_ep_{name}", doc, labels=["engine"])
        c.add_metric(eng, value)
        return c

    def by(name, doc, label, values: dict):
        c = CounterMetricFamily(f"resilient_ep_{name}", doc, labels=["engine", *label])
        for k, v in sorted(values.items()):
            c.add_metric([m.engine, *((k,) if isinstance(k, str) else k)], v)
        return c

    def histogram(name, doc, values: Iterable[float]):
        values = sorted(float(v) for v in values)
        buckets = [(_le(b), bisect.bisect_right(values, b)) for b in BUCKETS_S]
        buckets.append(("+Inf", len(values)))
        h = HistogramMetricFamily(f"resilient_ep_{name}", doc, labels=["engine"])
        h.add_metric(eng, buckets, sum(values))
        return h

    yield gauge("ranks", "Ranks of the instance", m.ranks)
    yield gauge("live_ranks", "Ranks live now", m.live_ranks)
    yield gauge("membership_epoch", "Membership epoch (one bump per change)", m.epoch)
    yield gauge("uncovered_experts", "(layer, expert) pairs without a live replica",
                m.uncovered_experts)
    failovers = {"crash": 0, "hang": 0, **m.failovers}  # vLLM also: "reported"
    yield by("failovers", "Ranks lost and recovered from, by kind", ["kind"], failovers)
    yield histogram("detection_seconds", "Failure to detection, seconds", m.detection_s)
    yield histogram("stall_seconds", "Failure until every survivor has stepped again, seconds",
                    m.stall_s)
    yield by("rejected_messages", "Control-plane messages dropped, by component and reason",
             ["component", "reason"], m.rejected)
    yield by("loop_restarts", "Receive loops restarted after an error, by component",
             ["component"], m.loop_restarts)
    yield counter("requests_migrated", "Requests moved off a lost rank", m.requests_migrated)
    yield counter("poisoned_requests", "Requests failed by recovery.max_request_failures",
                  m.poisoned_requests)
    yield counter("kv_restores", "Migrated requests resumed from a KV checkpoint", m.kv_restores)
    yield counter("restored_tokens", "Tokens whose KV came from a checkpoint", m.restored_tokens)
    yield counter("recomputed_tokens", "Tokens recomputed after a migration", m.recomputed_tokens)
    yield by("repair_copies", "Expert weight copies that restored coverage, by source",
             ["source"], {"host": 0, "disk": 0, **m.repair_copies})
    yield by("repair_bytes", "Bytes the repair copies moved, by source", ["source"],
             {"host": 0, "disk": 0, **m.repair_bytes})
    yield gauge("repairing_experts", "Experts whose repair copy is on its way",
                m.repairing_experts)
    yield gauge("active_shadows", "Shadow slots serving an expert now", m.active_shadows)
    yield counter("expert_waits", "MoE passes that waited for a repair copy", m.expert_waits)
    if m.kv_checkpoint_lag_tokens is not None:
        yield gauge("kv_checkpoint_lag_tokens", "Largest KV-checkpoint lag of a live rank, "
                    "tokens", m.kv_checkpoint_lag_tokens)


NAMES = ("ranks", "live_ranks", "membership_epoch", "uncovered_experts", "failovers",
         "detection_seconds", "stall_seconds", "rejected_messages", "loop_restarts",
         "requests_migrated", "poisoned_requests", "kv_restores", "restored_tokens",
         "recomputed_tokens", "kv_checkpoint_lag_tokens", "repair_copies", "repair_bytes",
         "repairing_experts", "active_shadows", "expert_waits")
"""The metric names without the ``resilient_ep_`` prefix (counters also without ``_total``)."""


def _le(b: float) -> str:
    return repr(float(b))


class _Collector:
    def __init__(self, source: Callable[[], InstanceMetrics]):
        self.source = source

    def collect(self):
        yield from _families(self.source())


def render(metrics: InstanceMetrics | Callable[[], InstanceMetrics]) -> bytes:
    """Prometheus' text exposition format of ``metrics`` (or of what the callable returns)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics if callable(metrics) else (lambda: metrics)))
    return generate_latest(registry)
