"""Liveness beacons from the engine-core processes to the front end.

A SIGKILLed engine core is seen by the front end at once (its process sentinel). A *frozen*
one (SIGSTOP, a stuck driver call holding the interpreter) never exits, so vLLM would wait on
it forever. Each engine core of a failover-enabled instance runs :class:`Beacon`, a thread
that sends a tiny message every ``detector.heartbeat_interval_ms`` to the front end's socket
(``ipc://<instance dir>/beacons``). The front end (``frontend.py``) feeds them to the core's
:class:`~resilient_ep.detector.FailureDetector`; a rank silent for
``detector.heartbeat_timeout_ms`` is fenced: its engine core and the engine core's children
(its workers) are SIGKILLed, and failover proceeds as for a crash. Fencing first means a rank
that wakes up later cannot serve anything twice.
"""

from __future__ import annotations

import os
import threading

import zmq

__all__ = ["Beacon", "beacon_endpoint", "start_beacon"]

_started: "Beacon | None" = None


def beacon_endpoint(instance: str) -> str:
    from .groups import endpoints

    return endpoints(instance, "beacons", 1)[0]


class Beacon:
    def __init__(self, endpoint: str, dp_rank: int, interval_s: float):
        self.endpoint, self.dp_rank, self.interval_s = endpoint, dp_rank, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"resilient-ep-beacon-dp{dp_rank}")
        self._thread.start()

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(self.endpoint)
        msg = f"{self.dp_rank} {os.getpid()}".encode()
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    sock.send(msg, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
        except zmq.ZMQError:
            pass
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()


def start_beacon(vllm_config) -> Beacon | None:
    """Start this engine core's beacon once (no-op without failover)."""
    global _started
    if _started is not None:
        return _started
    from .groups import failover_enabled, instance_of

    if not failover_enabled(vllm_config):
        return None
    cfg, instance = instance_of(vllm_config)
    _started = Beacon(beacon_endpoint(instance),
                      int(vllm_config.parallel_config.data_parallel_rank),
                      cfg.detector.heartbeat_interval_ms / 1000.0)
    return _started
