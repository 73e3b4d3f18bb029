"""Per-policy outputs of a run.

- ``goodput``: output tokens per second in bins of ``sim.goodput_bin_s`` (recomputation
  excluded: re-prefilled and restored tokens are not counted twice).
- ``stall_s``: one value per failure, from the failure until output tokens flow again (the
  first decode step after the resume has completed: the surviving requests' in-flight step,
  before requests put back meanwhile are prefilled; with none surviving, the first step after
  the re-prefill) and, where requests are restored from KV checkpoints, they are back on a
  live rank. A failure of a rank already out of the instance
  stalls nothing (0). A stall still running at the end is cut at ``duration_s``.
- ``reintegration_pause_s``: total time the healthy ranks were paused to admit relaunched ranks.
- ``time_to_95pct_s``: from the first failure until goodput (centered moving average over
  ``sim.smoothing_s``) is >= 95 % of pre-fault goodput and stays there for ``sim.sustain_s``
  (or to the end of the run); ``None`` if it never is, or without failures.
- ``requests_lost``: requests refused (front end down), given up in the queue
  (``request_timeout_s``) or dropped with a dead rank's attention state.
- ``recomputed_tokens``: prefill work redone for requests that were already running.
- ``availability``: fraction of the run during which the instance was stepping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from resilient_ep.sim.engine import Instance
from resilient_ep.sim.scenario import Scenario

__all__ = ["PolicyResult", "summarize", "time_to_fraction"]


@dataclass
class PolicyResult:
    """What one policy achieved on one scenario."""

    policy: str
    failure_times_s: list[float]
    """When each failure happened (trace and generated), in order; ``stall_s`` matches it."""
    stall_s: list[float]
    reintegration_pause_s: float
    time_to_95pct_s: float | None
    requests_lost: int
    recomputed_tokens: int
    availability: float
    pre_fault_goodput: float | None
    """Mean tokens/s over [sim.baseline_start_s, first failure)."""
    mean_goodput: float
    completed_requests: int
    goodput_t_s: list[float] = field(repr=False)
    goodput: list[float] = field(repr=False)
    """Tokens per second in each bin starting at ``goodput_t_s``."""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("policy")
        d["goodput"] = {"t_s": self.goodput_t_s, "tokens_per_s": self.goodput}
        d.pop("goodput_t_s")
        return d


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return x
    k = np.ones(window)
    num = np.convolve(x, k, mode="same")
    den = np.convolve(np.ones_like(x), k, mode="same")
    return num / den


def time_to_fraction(goodput: np.ndarray, bin_s: float, t_first: float, pre: float,
                     *, fraction: float = 0.95, smoothing_s: float = 5.0,
                     sustain_s: float = 30.0) -> float | None:
    """Seconds from ``t_first`` until smoothed goodput is >= ``fraction * pre`` and stays
    there for ``sustain_s`` (or to the end)."""
    if pre <= 0 or len(goodput) == 0:
        return None
    s = _smooth(goodput, max(1, int(round(smoothing_s / bin_s))))
    ok = s >= fraction * pre
    n = len(ok)
    # run[i]: consecutive ok bins starting at i.
    run = np.zeros(n + 1, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        run[i] = run[i + 1] + 1 if ok[i] else 0
    need = max(1, int(round(sustain_s / bin_s)))
    start = min(n - 1, int(t_first // bin_s))
    for i in range(start, n):
        if run[i] >= min(need, n - i):
            return max(0.0, i * bin_s - t_first)
    return None


def summarize(sc: Scenario, policy: str, inst: Instance) -> PolicyResult:
    bin_s = sc.sim.goodput_bin_s
    g = inst.bins / bin_s
    # The last bin may be partial.
    tail = sc.duration_s - (len(g) - 1) * bin_s
    if 0 < tail < bin_s:
        g[-1] = inst.bins[-1] / tail
    t = np.arange(len(g)) * bin_s
    records = inst.records
    pre = None
    ttr = None
    if records:
        t_first = min(r.time_s for r in records)
        lo = int(sc.sim.baseline_start_s // bin_s)
        hi = int(t_first // bin_s)
        if hi <= lo:
            lo = 0
        if hi > lo:
            pre = float(g[lo:hi].mean())
            ttr = time_to_fraction(g, bin_s, t_first, pre, smoothing_s=sc.sim.smoothing_s,
                                   sustain_s=sc.sim.sustain_s)
    else:
        lo = int(sc.sim.baseline_start_s // bin_s)
        pre = float(g[lo:].mean()) if len(g) > lo else float(g.mean())
    return PolicyResult(
        policy=policy,
        failure_times_s=[round(r.time_s, 3) for r in records],
        stall_s=[round(r.stall_s(sc.duration_s), 3) for r in records],
        reintegration_pause_s=round(inst.reintegration_pause_s, 3),
        time_to_95pct_s=None if ttr is None else round(ttr, 3),
        requests_lost=int(round(inst.requests_lost)),
        recomputed_tokens=int(round(inst.recomputed_tokens)),
        availability=round(1.0 - inst.unavailable_s / sc.duration_s, 6),
        pre_fault_goodput=None if pre is None else round(pre, 1),
        mean_goodput=round(float(inst.bins.sum() / sc.duration_s), 1),
        completed_requests=int(round(inst.completed)),
        goodput_t_s=[round(float(x), 3) for x in t],
        goodput=[round(float(x), 1) for x in g],
        details=dict(inst.extras),
    )
