"""Where every socket of one instance lives: :class:`Addressing` (pure, no I/O).

Two layouts, one interface:

- **one host** (:meth:`Addressing.ipc`): Unix sockets in the instance's private directory,
  ``ipc://<dir>/<channel>-<rank>`` (the default: no port to choose, nothing reachable from
  another machine);
- **several hosts** (:meth:`Addressing.tcp`): TCP on each node's address. Ranks are placed on
  the nodes node-major (``ranks_per_node`` consecutive ranks per node, as
  ``placement.ranks_per_node`` assumes), the front end on node 0. Ports are derived, so every
  process of every node computes the same endpoints from the same configuration and nothing
  has to be exchanged at start: a per-rank channel ``c`` (the ``c``-th of
  ``rank_channels``) of rank ``r`` listens on ``base_port + c * num_ranks + r``, the front
  end's ``f``-th channel on ``base_port + len(rank_channels) * num_ranks + f``. The instance
  uses ``span`` ports from ``base_port`` on every node (fewer are bound on each).

Every socket of both layouts is authenticated the same way (ZeroMQ CURVE with keys derived
from the instance key, :mod:`.curve`); TCP adds nothing to trust but the instance key, which
must therefore be on every node (``docs/multinode.md``). Datagram channels (UDP: the
liveness beacons and leases between hosts, :mod:`resilient_ep.liveness.datagrams`) use
:meth:`Addressing.frontend_udp`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Addressing", "RANK_CHANNELS", "FRONTEND_CHANNELS", "check_host"]

RANK_CHANNELS = ("data", "control", "kvstore")
"""The reference runtime's per-rank sockets: dispatch/combine inbox, control PAIR, KV peer
store."""

FRONTEND_CHANNELS = ("liveness",)
"""The reference runtime's front-end sockets: the liveness socket (beacons in, leases out)."""

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def check_host(host: str) -> str | None:
    """None when ``host`` can name a node (an IPv4 address or a host name), else why not."""
    if not isinstance(host, str) or not host:
        return "must be a non-empty string"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None if _HOSTNAME.match(host) else "is neither an IPv4 address nor a host name"
    if ip.version != 4:
        return "is an IPv6 address; only IPv4 addresses and host names are supported"
    if ip.is_unspecified or ip.is_multicast:
        return "must be the node's own address, not a wildcard or multicast address"
    return None


@dataclass(frozen=True)
class Addressing:
    kind: Literal["ipc", "tcp"]
    num_ranks: int
    run_dir: str = ""
    """``ipc``: the instance's private directory."""
    hosts: tuple[str, ...] = ()
    """``tcp``: each node's address, node 0 (the front end's) first."""
    base_port: int = 0
    """``tcp``: the first port of the instance's range."""
    rank_channels: tuple[str, ...] = RANK_CHANNELS
    frontend_channels: tuple[str, ...] = FRONTEND_CHANNELS

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.num_ranks}")
        if self.kind == "ipc":
            if not self.run_dir:
                raise ValueError("ipc addressing needs the instance's directory")
            return
        if self.kind != "tcp":
            raise ValueError(f"transport.address must be 'ipc' or 'tcp', got {self.kind!r}")
        if not self.hosts:
            raise ValueError("transport.node_addresses: tcp addressing needs one address per node")
        if self.num_ranks % len(self.hosts):
            raise ValueError(f"ranks ({self.num_ranks}) must be a multiple of the nodes in "
                             f"transport.node_addresses ({len(self.hosts)})")
        if not 1024 <= self.base_port or self.base_port + self.span - 1 > 65535:
            raise ValueError(f"transport.base_port: {self.base_port} + {self.span} ports "
                             f"must lie in 1024..65535")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def ipc(cls, run_dir: str, num_ranks: int, **channels) -> "Addressing":
        return cls("ipc", num_ranks, run_dir=str(run_dir), **channels)

    @classmethod
    def tcp(cls, hosts, num_ranks: int, base_port: int, **channels) -> "Addressing":
        return cls("tcp", num_ranks, hosts=tuple(hosts), base_port=int(base_port), **channels)

    # ------------------------------------------------------------------ layout
    @property
    def num_nodes(self) -> int:
        return len(self.hosts) if self.kind == "tcp" else 1

    @property
    def ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes

    @property
    def span(self) -> int:
        """Ports the instance uses from ``base_port`` (tcp)."""
        return len(self.rank_channels) * self.num_ranks + len(self.frontend_channels)

    def node_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.ranks_per_node

    def ranks_of(self, node: int) -> list[int]:
        n = self.ranks_per_node
        return list(range(node * n, (node + 1) * n))

    def host_of(self, rank: int) -> str:
        """The address rank ``rank``'s sockets bind (tcp), or ``localhost`` (ipc)."""
        return self.hosts[self.node_of(rank)] if self.kind == "tcp" else "localhost"

    @property
    def frontend_host(self) -> str:
        return self.hosts[0] if self.kind == "tcp" else "localhost"

    # ------------------------------------------------------------------ endpoints
    def rank_endpoint(self, channel: str, rank: int) -> str:
        """Where rank ``rank`` binds its ``channel`` socket (and its peers connect)."""
        c = self._slot(self.rank_channels, channel)
        self._check_rank(rank)
        if self.kind == "ipc":
            return f"ipc://{self.run_dir}/{channel}-{rank}"
        return f"tcp://{self.host_of(rank)}:{self.base_port + c * self.num_ranks + rank}"

    def rank_endpoints(self, channel: str) -> list[str]:
        return [self.rank_endpoint(channel, r) for r in range(self.num_ranks)]

    def frontend_endpoint(self, channel: str) -> str:
        """Where the front end binds its ``channel`` socket."""
        f = self._slot(self.frontend_channels, channel)
        if self.kind == "ipc":
            return f"ipc://{self.run_dir}/{channel}"
        return f"tcp://{self.frontend_host}:{self._frontend_port(f)}"

    def frontend_udp(self, channel: str) -> tuple[str, int]:
        """``(host, port)`` of the front end's datagram ``channel`` (tcp layouts only: the
        same port number as its TCP endpoint, a different protocol)."""
        if self.kind != "tcp":
            raise ValueError("datagram channels exist between hosts only (tcp addressing)")
        return self.frontend_host, self._frontend_port(self._slot(self.frontend_channels, channel))

    def _frontend_port(self, f: int) -> int:
        return self.base_port + len(self.rank_channels) * self.num_ranks + f

    @staticmethod
    def _slot(channels: tuple[str, ...], channel: str) -> int:
        try:
            return channels.index(channel)
        except ValueError:
            raise ValueError(f"unknown channel {channel!r}; this instance has "
                             f"{list(channels)}") from None

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} outside 0..{self.num_ranks - 1}")
