"""Cluster-scale simulator: an EP instance of up to thousands of ranks serving a request
stream under failures, one recovery policy at a time (SimPy discrete-event engine).

``Scenario.from_yaml(path)`` -> ``simulate(scenario)`` -> ``{policy: PolicyResult}``;
``resilient-ep simulate SCENARIO.yaml`` is the command. See ``docs/simulator.md``.
"""

from resilient_ep.sim.scenario import Scenario, ScenarioError

__all__ = ["Scenario", "ScenarioError", "simulate"]


def simulate(scenario, policies=None):
    """Run every enabled policy (or ``policies``) on ``scenario``; see ``sim.run.simulate``."""
    from resilient_ep.sim.run import simulate as _simulate

    return _simulate(scenario, policies)
