"""Failure events: from the scenario's trace, plus generated ones.

The trace lists ``{time_s, rank, kind}`` with kind ``crash``, ``hang`` or ``recover``. A
``recover`` ends the hardware downtime of the latest earlier failure of that rank (one that
no other ``recover`` ended yet): until then the rank cannot be relaunched. A failure that no
``recover`` ends is a software fault: the rank may be relaunched on its GPU right after
detection. A ``recover`` with no earlier failure of its rank is an error.

Generated failures (``generated`` in the scenario) are Poisson processes: each rank fails with
``rank_mtbf_h`` (a ``hang_fraction`` of them hangs), each node with ``node_mtbf_h`` (all its
ranks crash together and stay down ``node_repair_s``). A generated failure of a rank whose
hardware is still down is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from resilient_ep.sim.scenario import Scenario, ScenarioError

__all__ = ["FailureEvent", "build_events"]


@dataclass(frozen=True)
class FailureEvent:
    """One rank failure as the simulator replays it."""

    time_s: float
    """When the rank fails."""

    rank: int
    """Which rank."""

    kind: Literal["crash", "hang"]
    """Crash (connection loss) or hang (heartbeat timeout)."""

    hardware_back_s: float
    """Earliest time the rank can be relaunched on its GPU (``time_s`` for a software fault)."""

    origin: str = "trace"
    """``trace``, ``generated-rank`` or ``generated-node``."""


def _trace_events(sc: Scenario) -> list[FailureEvent]:
    order = sorted(range(len(sc.failures)), key=lambda i: (sc.failures[i].time_s, i))
    out: list[FailureEvent] = []
    open_failure: dict[int, int] = {}  # rank -> index in out of its latest unrecovered failure
    recovered_at: dict[int, float] = {}
    for i in order:
        f = sc.failures[i]
        if f.kind == "recover":
            if f.rank not in open_failure:
                raise ScenarioError(f"failures[{i}]", {"time_s": f.time_s, "rank": f.rank,
                                                       "kind": f.kind},
                                    f"recover of rank {f.rank} has no earlier crash or hang "
                                    "of that rank")
            recovered_at[open_failure.pop(f.rank)] = f.time_s
            continue
        out.append(FailureEvent(f.time_s, f.rank, f.kind, f.time_s))
        open_failure[f.rank] = len(out) - 1
    return [FailureEvent(ev.time_s, ev.rank, ev.kind, recovered_at.get(j, ev.time_s), "trace")
            for j, ev in enumerate(out)]


def _generated_events(sc: Scenario, rng: np.random.Generator) -> list[FailureEvent]:
    g = sc.generated
    out: list[FailureEvent] = []
    T = sc.duration_s
    if g.rank_mtbf_h > 0:
        counts = rng.poisson(T / (g.rank_mtbf_h * 3600.0), size=sc.ranks)
        for rank in np.flatnonzero(counts):
            for t in np.sort(rng.uniform(0.0, T, size=counts[rank])):
                kind = "hang" if rng.random() < g.hang_fraction else "crash"
                out.append(FailureEvent(float(t), int(rank), kind, float(t) + g.rank_repair_s,
                                        "generated-rank"))
    if g.node_mtbf_h > 0:
        counts = rng.poisson(T / (g.node_mtbf_h * 3600.0), size=sc.nodes)
        for node in np.flatnonzero(counts):
            for t in np.sort(rng.uniform(0.0, T, size=counts[node])):
                first = int(node) * sc.ranks_per_node
                for rank in range(first, first + sc.ranks_per_node):
                    out.append(FailureEvent(float(t), rank, "crash", float(t) + g.node_repair_s,
                                            "generated-node"))
    return out


def build_events(sc: Scenario, rng: np.random.Generator) -> list[FailureEvent]:
    """Trace plus generated failures, sorted by time (ties by rank)."""
    events = _trace_events(sc) + _generated_events(sc, rng)
    events.sort(key=lambda e: (e.time_s, e.rank, e.origin))
    kept: list[FailureEvent] = []
    back: dict[int, float] = {}
    for ev in events:
        if ev.origin != "trace" and ev.time_s < back.get(ev.rank, -1.0):
            continue  # generated failure of a rank whose hardware is still down
        back[ev.rank] = max(back.get(ev.rank, -1.0), ev.hardware_back_s)
        kept.append(ev)
    return kept
