"""The engine core's liveness beacon (the wire format and the sender are the core's
:mod:`resilient_ep.liveness.beacons`).

A SIGKILLed engine core is seen by the monitor at once (its process sentinel). A *frozen* one
(SIGSTOP, a stuck driver call holding the interpreter) never exits, so vLLM would wait on it
forever. Each engine core of a failover-enabled instance runs a
:class:`~resilient_ep.liveness.Beacon` to the instance's liveness socket; the monitor
(``liveness.py``) fences a rank silent for ``detector.heartbeat_timeout_ms``: its engine core
and the engine core's children (its workers) are SIGKILLed, and failover proceeds as for a
crash. Fencing first means a rank that wakes up later cannot serve anything twice.
"""

from __future__ import annotations

from resilient_ep.liveness import Beacon

__all__ = ["start_beacon", "leased_hold"]

_started: Beacon | None = None


def start_beacon(vllm_config) -> Beacon | None:
    """Start this engine core's beacon once (no-op without failover)."""
    global _started
    if _started is not None:
        return _started
    from .instance import failover_enabled, instance_of
    from .liveness import beacon_endpoint

    if not failover_enabled(vllm_config):
        return None
    cfg, instance = instance_of(vllm_config)
    endpoint = beacon_endpoint(instance)  # joins the instance: its key is this process's now
    from . import multinode

    rank = int(vllm_config.parallel_config.data_parallel_rank)
    if multinode.registered(instance) is not None:  # across nodes: datagrams and a lease
        _started = multinode.start_leased_beacon(instance, rank, cfg)
        return _started
    _started = Beacon(endpoint, rank, cfg.detector.heartbeat_interval_ms / 1000.0)
    return _started


def leased_hold(engine) -> None:
    """Across nodes: wait while this engine core's lease has run out (``multinode.py``)."""
    if _started is not None and hasattr(_started, "holds_lease"):
        from .multinode import hold_without_lease

        hold_without_lease(_started, int(engine.vllm_config.parallel_config.data_parallel_rank))
