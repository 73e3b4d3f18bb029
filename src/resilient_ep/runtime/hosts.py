"""Where the reference runtime's ranks run and how its sockets find each other:
:class:`RankHosts`.

- **One host** (the default): Unix sockets in the run directory (``transport.address:
  ipc``), or the data plane on 127.0.0.1 ports picked free (``tcp``); control and liveness
  stay on Unix sockets; ranks are started as local processes.
- **Several hosts** (``transport.node_addresses``): every socket on TCP at its node's address
  (:class:`~resilient_ep.transport.addressing.Addressing`: ports derived from
  ``transport.base_port``), heartbeats and leases as UDP datagrams
  (:mod:`resilient_ep.liveness.datagrams`), ranks ``ranks / nodes`` per node, node-major, the
  front end on node 0. A rank of node ``n`` is started with the command prefix
  ``launcher(n)`` (``ip netns exec <node>`` on the test bed); the model directory and the
  instance key file must be at the same paths on every node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import ResilienceConfig
from ..transport.addressing import Addressing
from ..transport.zmq_transport import data_endpoint
from .rank_processes import free_port_base

__all__ = ["RankHosts", "Launcher"]

Launcher = Callable[[int], list[str]]
"""``launcher(node)``: the command prefix that runs a program on ``node``."""


class RankHosts:
    def __init__(self, config: ResilienceConfig, num_ranks: int, run_dir: Path,
                 launcher: Launcher | None = None):
        t = config.transport
        self.num_ranks = num_ranks
        self.run_dir = Path(run_dir)
        self.multi = bool(t.node_addresses)
        self.launcher = launcher
        self.lease_s = config.detector.lease_s
        self.heartbeat_interval_s = config.detector.heartbeat_interval_ms / 1000.0
        self.addressing: Addressing | None = None
        if self.multi:
            if not t.authenticate:
                raise ValueError("transport.authenticate: must be true when "
                                 "transport.node_addresses is set (the instance's sockets "
                                 "are reachable from the network)")
            if config.kv_checkpoint.enabled and config.kv_checkpoint.store == "shm":
                raise ValueError("kv_checkpoint.store: 'shm' is one host's memory, got it with "
                                 "transport.node_addresses; use 'peer' (or 'file' on a file "
                                 "system every node shares)")
            if config.repair.host_backup:
                raise ValueError("repair.host_backup: the reference runtime keeps it on one "
                                 "host only; leave it false with transport.node_addresses")
            self.addressing = Addressing.tcp(t.node_addresses, num_ranks, t.base_port)
            rpn = config.placement.ranks_per_node
            default_rpn = type(config.placement)().ranks_per_node
            if rpn != default_rpn and rpn != self.addressing.ranks_per_node:
                raise ValueError(f"placement.ranks_per_node ({rpn}) must be ranks ({num_ranks}) "
                                 f"/ nodes in transport.node_addresses "
                                 f"({self.addressing.num_nodes})")
        elif launcher is not None:
            raise ValueError("a launcher places ranks on nodes: it needs "
                             "transport.node_addresses")
        self._kind = t.address
        self._data_base: str | None = None

    @property
    def num_nodes(self) -> int:
        return self.addressing.num_nodes if self.multi else 1

    def node_of(self, rank: int) -> int:
        return self.addressing.node_of(rank) if self.multi else 0

    def ranks_of(self, node: int) -> list[int]:
        return self.addressing.ranks_of(node) if self.multi else list(range(self.num_ranks))

    # ------------------------------------------------------------------ endpoints
    def data_endpoints(self) -> list[str]:
        if self.multi:
            return self.addressing.rank_endpoints("data")
        if self._data_base is None:
            self._data_base = (str(self.run_dir) if self._kind == "ipc"
                               else str(free_port_base(self.num_ranks)))
        return [data_endpoint(self._kind, self._data_base, r) for r in range(self.num_ranks)]

    def control_endpoint(self, rank: int) -> str:
        if self.multi:
            return self.addressing.rank_endpoint("control", rank)
        return f"ipc://{self.run_dir}/control-{rank}"

    def kv_endpoints(self) -> list[str]:
        if self.multi:
            return self.addressing.rank_endpoints("kvstore")
        from ..kv.peer_store import peer_endpoint
        return [peer_endpoint(str(self.run_dir), r) for r in range(self.num_ranks)]

    def kv_nodes(self) -> list[int]:
        """The node of each rank, for the KV copies to leave the owner's node (several
        hosts); empty on one host."""
        return [self.node_of(r) for r in range(self.num_ranks)] if self.multi else []

    def heartbeat_endpoint(self) -> str:
        """One host: the coordinator's liveness PULL (ZeroMQ)."""
        return f"ipc://{self.run_dir}/heartbeat"

    def liveness_bind(self) -> tuple[str, int]:
        """Several hosts: where the coordinator's heartbeat datagram socket binds."""
        return self.addressing.frontend_udp("liveness")

    def rank_liveness(self, rank: int) -> dict:
        """The ``liveness`` part of a rank's spec: where it heartbeats, and its lease."""
        if not self.multi:
            return {"heartbeat": self.heartbeat_endpoint()}
        host, port = self.liveness_bind()
        return {"udp": [host, port], "bind_host": self.addressing.host_of(rank),
                "lease_s": self.lease_s}

    # ------------------------------------------------------------------ processes
    def prefix(self, rank: int) -> list[str]:
        """The command prefix that starts ``rank`` on its node (empty: here)."""
        return list(self.launcher(self.node_of(rank))) if self.launcher is not None else []

    def describe(self) -> dict:
        """For ``status()``: the nodes and their ranks."""
        if not self.multi:
            return {"nodes": 1}
        return {"nodes": self.num_nodes,
                "node_addresses": list(self.addressing.hosts),
                "ranks": {str(n): self.ranks_of(n) for n in range(self.num_nodes)},
                "base_port": self.addressing.base_port, "ports": self.addressing.span,
                "lease_ms": self.lease_s * 1000.0}
