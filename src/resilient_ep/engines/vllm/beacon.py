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

__all__ = ["Beacon", "DeathReporter", "beacon_endpoint", "parse_beacon", "start_beacon"]

_started: "Beacon | None" = None


def beacon_endpoint(instance: str) -> str:
    from .groups import endpoints

    return endpoints(instance, "beacons", 1)[0]


def parse_beacon(msg: bytes) -> tuple[str, int, int] | None:
    """``("alive", dp_rank, pid)`` or ``("dead", dp_rank, reporter)``; None when malformed."""
    try:
        parts = msg.split()
        if len(parts) == 2:
            kind, rank, other = "alive", int(parts[0]), int(parts[1])
        elif len(parts) == 3 and parts[0] == b"dead":
            kind, rank, other = "dead", int(parts[1]), int(parts[2])
        else:
            return None
    except ValueError:
        return None
    return (kind, rank, other) if rank >= 0 else None


class DeathReporter:
    """A :class:`~resilient_ep.transport.group.LiveGroup` listener that tells the front end
    which DP ranks this member's group lost (``b"dead <rank> <reporter>"``)."""

    def __init__(self, instance: str, reporter: int):
        self.endpoint = beacon_endpoint(instance)
        self.reporter = reporter
        self._sock = None
        self._sent: set[int] = set()

    def __call__(self, dead, epoch: int) -> None:
        if self._sock is None:
            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 1000)
            self._sock.setsockopt(zmq.SNDHWM, 100)
            self._sock.connect(self.endpoint)
        for rank in sorted(set(dead) - self._sent):
            try:
                self._sock.send(f"dead {rank} {self.reporter}".encode(), flags=zmq.NOBLOCK)
                self._sent.add(rank)
            except zmq.ZMQError:
                pass


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
