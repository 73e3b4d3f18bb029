"""vLLM data parallel across nodes with ``--enable-resilience``.

vLLM runs one instance on several hosts as ``vllm serve ... --data-parallel-size N
--data-parallel-size-local n --data-parallel-address HEAD --data-parallel-rpc-port P`` on the
head (DP ranks ``0..n-1``, the API servers) and the same with ``--headless
--data-parallel-start-rank k*n`` on node ``k``. With resilience on, every node also gets the
same ``transport.*`` settings (``--resilience-set``): ``transport.address=tcp``,
``transport.node_addresses=[HEAD, NODE1, ...]`` (node ``k`` holds DP ranks ``k*n..k*n+n-1``)
and ``transport.base_port``. Then (``docs/multinode.md``):

- **one instance**: its id is derived from the node addresses, the base port and vLLM's
  DP address and RPC port, so every ``vllm serve`` of it (and every process they start)
  names the same instance without being told; its key is ``transport.key_file`` if set
  (the same file on every node), else ``instance.key`` in the instance's directory, which
  must then be copied to the other nodes (a node that is not the head never makes one);
- **its sockets on TCP** at each rank's node address (:class:`Nodes`, ports from
  ``transport.base_port``): the failover groups (``core``, ``w<tp>``), the KV peer stores,
  the head's liveness socket (loss reports) and membership feed, all CURVE as on one host;
- **heartbeats and leases as datagrams** (``resilient_ep.liveness.datagrams``): every
  engine core heartbeats the head; the head's liveness monitor answers live ranks with a
  lease. An engine core whose lease runs out (a partition, a head gone or stalled) holds:
  it starts no step, and a step that finishes without a lease hands no output on, until a
  lease comes back (the head was only slow) or the rank is fenced and killed (the head fences
  after ``heartbeat_timeout_ms`` >= ``lease_ms``, so the rank holds before its requests
  move). The head records the loss of a remote rank when it fences it (its processes are
  not the head's to kill or to see exit);
- **on a headless node** the engine manager follows the membership instead of deciding it:
  it kills a local rank the head fenced, and returns once its engine cores are gone.

Not across nodes (refused at start): the Ray backend (``--data-parallel-backend ray``, also
on one node), the rejoin of a lost rank (``recovery.respawn``), a node count that does not
match ``transport.node_addresses``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from resilient_ep.config import ConfigError, ResilienceConfig
from resilient_ep.transport.addressing import Addressing

from ..common.instance import across_nodes

__all__ = ["Nodes", "nodes_of", "register", "registered", "endpoints", "instance_id",
           "check_topology", "node_environment", "monitor_across_nodes", "start_leased_beacon",
           "follow_head", "MAX_TP"]

log = logging.getLogger("vllm." + __name__)

MAX_TP = 8
RANK_CHANNELS = ("core", *(f"w{t}" for t in range(MAX_TP)), "kvstore")
FRONTEND_CHANNELS = ("beacons", "membership")


@dataclass(frozen=True)
class Nodes:
    """Where one multi-node instance's sockets live (DP ranks node-major, the head first)."""

    addressing: Addressing
    key_file: str
    local_ranks: tuple[int, ...]
    """The DP ranks of the node this process runs on."""

    @property
    def head(self) -> bool:
        """This process runs on the head (node 0: the liveness monitor, the API servers)."""
        return 0 in self.local_ranks

    def endpoints(self, kind: str, size: int) -> list[str]:
        if kind in FRONTEND_CHANNELS:
            return [self.addressing.frontend_endpoint(kind)] * size
        if kind not in RANK_CHANNELS:
            raise ValueError(f"resilient-ep: socket {kind!r} does not exist across nodes (a "
                             f"replacement rank's or a rejoin's groups; recovery.respawn and "
                             f"rejoins are not supported with transport.node_addresses)")
        if size != self.addressing.num_ranks:
            raise ValueError(f"resilient-ep: {size} members for {kind!r}, the instance has "
                             f"{self.addressing.num_ranks} DP ranks")
        return self.addressing.rank_endpoints(kind)

    def key_path(self, instance_dir) -> tuple[str, bool]:
        """The key file and whether this process may make it (only the head makes a key;
        another node without one refuses to start)."""
        return self.key_file or os.path.join(str(instance_dir), "instance.key"), self.head

    def beacon_udp(self) -> tuple[str, int]:
        return self.addressing.frontend_udp("beacons")


def nodes_of(cfg: ResilienceConfig, parallel_config: Any) -> Nodes | None:
    """The instance's nodes (None: one host)."""
    t = cfg.transport
    if not t.node_addresses:
        return None
    dp = int(parallel_config.data_parallel_size)
    local = int(getattr(parallel_config, "data_parallel_size_local", dp) or dp)
    rank = int(getattr(parallel_config, "data_parallel_rank", 0) or 0)
    addressing = Addressing.tcp(t.node_addresses, dp, t.base_port,
                                rank_channels=RANK_CHANNELS, frontend_channels=FRONTEND_CHANNELS)
    if addressing.ranks_per_node != local:
        raise ConfigError("transport.node_addresses", list(t.node_addresses),
                          f"names {addressing.num_nodes} node(s) for --data-parallel-size {dp}, "
                          f"but --data-parallel-size-local is {local}: give one address per "
                          f"node ({dp // max(local, 1)})")
    node = rank // local
    return Nodes(addressing, t.key_file, tuple(addressing.ranks_of(node)))


_registered: dict[str, Nodes] = {}


def register(instance: str, cfg: ResilienceConfig, parallel_config: Any) -> Nodes | None:
    """Record where ``instance``'s sockets live (called wherever a process learns its config,
    before it builds an address)."""
    nodes = _registered.get(instance)
    if nodes is None and cfg.transport.node_addresses:
        nodes = _registered[instance] = nodes_of(cfg, parallel_config)
        across_nodes(instance, nodes)
    return nodes


def registered(instance: str) -> Nodes | None:
    return _registered.get(instance)


def endpoints(instance: str, kind: str, size: int) -> list[str] | None:
    """TCP endpoints of a multi-node instance's ``kind`` sockets; None on one host."""
    nodes = _registered.get(instance)
    return None if nodes is None else nodes.endpoints(kind, size)


def instance_id(cfg: ResilienceConfig, engine_args: Any) -> str | None:
    """The id every node derives alike for a multi-node instance (None: one host)."""
    t = cfg.transport
    if not t.node_addresses:
        return None
    seed = "|".join([",".join(t.node_addresses), str(t.base_port),
                     str(getattr(engine_args, "data_parallel_address", None) or ""),
                     str(getattr(engine_args, "data_parallel_rpc_port", None) or "")])
    return "mn" + hashlib.sha256(seed.encode()).hexdigest()[:12]


def check_topology(engine_args: Any, cfg: ResilienceConfig, *, headless: bool) -> None:
    """Refuse, with the flag or key to change, what resilience does not cover."""
    backend = getattr(engine_args, "data_parallel_backend", "mp") or "mp"
    dp = int(getattr(engine_args, "data_parallel_size", 1) or 1)
    local = getattr(engine_args, "data_parallel_size_local", None)
    across = headless or (local is not None and int(local) < dp)
    if backend != "mp":
        raise ValueError(
            f"--data-parallel-backend {backend} is not supported with --enable-resilience: "
            "with Ray every engine core is a Ray actor, and the resilience layer watches, "
            "fences and fails over the engine-core processes of vLLM's default backend; a lost "
            "rank would take the instance down as without resilience. Use "
            "--data-parallel-backend mp (the default), on one node or across nodes "
            "(docs/vllm.md#across-nodes)")
    if across and not cfg.transport.node_addresses:
        raise ValueError(
            "--enable-resilience with data parallel across nodes (--headless or "
            "--data-parallel-size-local < --data-parallel-size) needs the nodes' addresses: "
            "--resilience-set transport.address=tcp --resilience-set "
            "'transport.node_addresses=[HEAD_IP, NODE1_IP, ...]' --resilience-set "
            "transport.base_port=PORT, the same on every node (docs/multinode.md)")
    if cfg.transport.node_addresses:
        if cfg.recovery.respawn:
            raise ConfigError("recovery.respawn", True, "is not supported across nodes "
                              "(transport.node_addresses): a lost rank rejoins on one host only")
        tp = int(getattr(engine_args, "tensor_parallel_size", 1) or 1)
        if tp > MAX_TP:
            raise ValueError(f"--tensor-parallel-size {tp}: at most {MAX_TP} across nodes")
        head = getattr(engine_args, "data_parallel_address", None)
        if head and head != cfg.transport.node_addresses[0]:
            raise ConfigError("transport.node_addresses", list(cfg.transport.node_addresses),
                              f"must start with the head, --data-parallel-address {head}")


# ---------------------------------------------------------------------- launcher
def _flag(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def local_address_towards(host: str) -> str | None:
    """This machine's address on the route to ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (Linux)."""
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                  struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        if socket.inet_ntoa(raw[20:24]) == address:
            return name
    return None


def node_environment(argv: Sequence[str], env: MutableMapping[str, str]) -> dict[str, str]:
    """A ``vllm serve`` of a multi-node instance (``--data-parallel-address`` not loopback):
    ``VLLM_HOST_IP`` is this node's address on the route to the head, and
    ``GLOO_SOCKET_IFNAME`` its interface (else gloo resolves the host name, often to
    127.0.0.1, and the DP group never forms). Anything set already wins. Returns what it
    set."""
    head = _flag(argv, "--data-parallel-address")
    if not head:
        return {}
    try:
        if ipaddress.ip_address(head).is_loopback:
            return {}
    except ValueError:
        pass  # a host name
    mine = env.get("VLLM_HOST_IP") or local_address_towards(head)
    if mine is None:
        return {}
    out = {}
    if "VLLM_HOST_IP" not in env:
        env["VLLM_HOST_IP"] = out["VLLM_HOST_IP"] = mine
    if "GLOO_SOCKET_IFNAME" not in env:
        iface = interface_of(mine)
        if iface is not None:
            env["GLOO_SOCKET_IFNAME"] = out["GLOO_SOCKET_IFNAME"] = iface
    return out


def monitor_across_nodes(instance: str, local: dict, size: int) -> dict:
    """The head's liveness monitor across nodes: the DP ranks it has no process of, and its
    heartbeat datagram socket. ``{}`` on one host."""
    nodes = _registered.get(instance)
    if nodes is None:
        return {}
    from resilient_ep.transport import wire

    return {"remote": [r for r in range(size) if r not in local],
            "datagrams": (nodes.beacon_udp(), wire.process_key())}


def start_leased_beacon(instance: str, rank: int, cfg: ResilienceConfig):
    """An engine core's heartbeat to the head, as datagrams, and the lease it earns
    (:func:`hold_without_lease` is where the engine core obeys it)."""
    from resilient_ep.liveness.datagrams import LeaseBeacon
    from resilient_ep.transport import wire

    nodes = _registered[instance]
    d = cfg.detector
    return LeaseBeacon(nodes.beacon_udp(), rank, d.heartbeat_interval_ms / 1000.0, d.lease_s,
                       key=wire.process_key(), bind_host=nodes.addressing.host_of(rank))


def hold_without_lease(beacon, rank: int) -> float:
    """Called by the engine core before a step and before it hands the step's outputs on:
    while a lease it held has run out (a partition, a head that stopped answering), wait.
    The head may be moving this rank's requests: nothing may leave it. Either a lease comes
    back (the head was only slow: go on) or the head fences the rank and it is killed
    (by the head, or on a headless node by its engine manager once it hears of the fence).
    Returns the seconds held."""
    import time

    if beacon is None or not getattr(beacon, "granted", 0) or beacon.holds_lease():
        return 0.0
    t0 = time.monotonic()
    log.warning("resilient-ep: DP rank %d has no lease (the head has not answered for "
                "%.0f ms): holding until it answers or fences this rank", rank,
                beacon.lease_s * 1000)
    while not beacon.holds_lease():
        time.sleep(beacon.interval_s / 4)
    held = time.monotonic() - t0
    log.warning("resilient-ep: DP rank %d has a lease again after %.0f ms", rank, held * 1000)
    return held


def follow_head(instance: str, procs: list, size: int, stopped) -> str | None:
    """A headless node's engine manager: the head's monitor decides; this node kills a local
    rank the head fenced (it may still run: frozen, or cut off and not yet out of lease) and
    returns once every local engine core is gone or ``stopped`` is set. Returns why it
    stopped serving (None: stopped on request)."""
    from .fencing import RankProcesses
    from .liveness import membership_replica

    ranks = RankProcesses(procs)
    local = set(ranks.by_rank)
    replica = membership_replica(instance, size)

    def on_loss(loss) -> None:
        if loss.rank in local:
            ranks.fence(loss.rank, f"was fenced by the head ({loss.cause})")

    replica.on_loss(on_loss)
    for event in replica.events():  # fenced before we subscribed
        if getattr(event, "kind", "") != "join":
            on_loss(event)
    while not stopped.wait(0.5):
        ranks.census()
        if all(p.exitcode is not None for p in ranks.by_rank.values()):
            return "every engine core of this node"
    return None
