"""The resilience metrics of a vLLM instance (:class:`resilient_ep.metrics.InstanceMetrics`)
from its ``/resilience/status`` document (``status.py``): what the front end, its liveness
monitor and every live engine and worker already count, read at scrape time.

- failovers: one per DP rank lost (``failovers``), ``crash`` when its engine core exited,
  ``hang`` when it went silent and was fenced, ``reported`` when its peers' failover group
  lost it first (its worker died under a live engine core, most often);
- detection: from an injected fault (``faults.py``: when it fired) to the front end's
  detection; failures nobody injected have no known start and are not observed;
- stall: from the failure (injected, else detected) to the first output of a survivor after
  the lost rank's requests were re-admitted;
- rejected messages: the liveness socket of this process and each engine's and worker's
  failover group, by reason; loop restarts: this process's monitor or subscription;
- KV: loads from KV checkpoints and their tokens (the workers' connectors); recomputed tokens
  are the re-admitted tokens no checkpoint covered.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ...metrics import InstanceMetrics

__all__ = ["from_status"]

_KIND = {"exit": "crash", "hang": "hang", "reported": "reported"}
"""A loss's cause -> the ``kind`` label: the process exited, it went silent, or a failover
group of its peers lost it (a worker killed under a live engine core, most often)."""


def from_status(status: dict[str, Any]) -> InstanceMetrics:
    ranks = status.get("ranks", [])
    events = status.get("failovers", [])
    failovers: Counter[str] = Counter(_KIND.get(e.get("cause"), "hang") for e in events)
    detection, stall = [], []
    for e in events:
        detected, injected = e.get("detected_monotonic"), e.get("injected_monotonic")
        if injected is not None and detected is not None:
            detection.append(max(0.0, detected - injected))
        first = e.get("first_output_monotonic")
        start = injected if injected is not None else detected
        if first is not None and start is not None:
            stall.append(max(0.0, first - start))
    rejected: Counter[tuple[str, str]] = Counter()
    liveness = status.get("liveness", {})
    for reason, n in liveness.get("dropped", {}).items():
        rejected["liveness", reason] += int(n)
    loads = restored = 0
    for engine in status.get("counters", []):
        for reason, n in engine.get("dropped", {}).items():
            rejected["engine-group", reason] += int(n)
        for w in engine.get("workers", []):
            for reason, n in w.get("dropped", {}).items():
                rejected["worker-group", reason] += int(n)
            kv = w.get("kv") or {}
            loads += int(kv.get("loads", 0))
            restored += int(kv.get("external_hit_tokens", 0))
    readmitted_tokens = sum(int(e.get("readmitted_tokens", 0)) for e in events)
    ex = status.get("experts") or {}
    repair = ex.get("repair", {})
    return InstanceMetrics(
        engine="vllm", ranks=len(ranks),
        live_ranks=sum(1 for r in ranks if r.get("state") == "live"),
        epoch=int(status.get("epoch", 0)),
        uncovered_experts=len(status.get("uncovered_experts", [])),
        failovers=dict(failovers), detection_s=detection, stall_s=stall,
        rejected=dict(rejected),
        loop_restarts={"liveness": int(liveness.get("restarts", 0))} if liveness else {},
        requests_migrated=sum(int(e.get("readmitted", 0)) for e in events),
        poisoned_requests=len(status.get("poisoned_requests", [])),
        kv_restores=loads, restored_tokens=restored,
        recomputed_tokens=max(0, readmitted_tokens - restored),
        kv_checkpoint_lag_tokens=None,
        repair_copies={k: int(v.get("copies", 0)) for k, v in repair.items()},
        repair_bytes={k: int(v.get("bytes", 0)) for k, v in repair.items()},
        repairing_experts=len(ex.get("repairing", [])),
        active_shadows=int(ex.get("active_shadows", 0)),
        expert_waits=int(ex.get("counters", {}).get("waits", 0)))
