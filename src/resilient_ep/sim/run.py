"""Run every enabled policy of a scenario on the same failures and arrivals."""

from __future__ import annotations

import numpy as np

from resilient_ep.sim.engine import Simulation, make_arrivals
from resilient_ep.sim.failures import build_events
from resilient_ep.sim.metrics import PolicyResult, summarize
from resilient_ep.sim.scenario import Scenario

__all__ = ["simulate"]


def simulate(sc: Scenario, policies: list[str] | None = None) -> dict[str, PolicyResult]:
    """``{policy: PolicyResult}`` in report order; deterministic for ``sc.seed``."""
    names = policies or sc.policies.enabled()
    events = build_events(sc, np.random.default_rng([sc.seed, 2]))
    arrivals = make_arrivals(sc)
    out: dict[str, PolicyResult] = {}
    for name in names:
        sim = Simulation(sc, name, events=events, arrivals=arrivals)
        out[name] = summarize(sc, name, sim.run())
    return out
