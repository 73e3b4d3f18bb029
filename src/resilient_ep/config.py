"""Resilience configuration: nested frozen dataclasses, one docstring per field.

Three ways in, one object out:

- ``ResilienceConfig.from_yaml(path)``: the engine config YAML (``examples/resilience.yaml``);
- ``ResilienceConfig.from_dict(d)``: what an engine flag passes (``--additional-config``);
- ``cfg.with_overrides(["detector.heartbeat_interval_ms=20", ...])``: ``key.sub=value`` strings.

Every error is a :class:`ConfigError` that names the dotted field and the offending value,
for example ``placement.redundant_slots_per_rank: must be >= 0, got -1``. ``enabled=False``
turns the whole layer into a no-op; every other default works out of the box.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .schema import FieldError, build, to_plain

__all__ = ["NOT_BUILT", "changed_keys", "refuse_unsupported", 
    "ConfigError",
    "DetectorConfig",
    "PlacementConfig",
    "TransportConfig",
    "KVCheckpointConfig",
    "ShadowConfig",
    "RepairConfig",
    "RecoveryConfig",
    "MetricsConfig",
    "ResilienceConfig",
]


class ConfigError(FieldError):
    """A configuration value is unknown, of the wrong type or impossible.

    ``field`` is the dotted path (``kv_checkpoint.interval_tokens``), ``value`` what was given.
    """


def _check(cond: bool, field: str, value: Any, reason: str) -> None:
    if not cond:
        raise ConfigError(field, value, reason)


@dataclass(frozen=True)
class DetectorConfig:
    """Failure detection: crashes from the transport, hangs from heartbeats."""

    heartbeat_interval_ms: float = 50.0
    """How often each rank sends a heartbeat to every peer."""

    heartbeat_timeout_ms: float = 150.0
    """A peer silent for this long is declared hung and fenced. Must exceed the interval."""

    crash_detection: bool = True
    """Declare a peer dead as soon as its connection drops (socket monitor), without waiting
    for the heartbeat timeout."""

    lease_ms: float | None = None
    """Between hosts (``transport.node_addresses``): a rank serves only while it holds a lease
    from the front end, renewed by the front end's answer to each of its heartbeats and
    counted from when that heartbeat was *sent*. A rank that has not heard an answer to a
    heartbeat sent in the last ``lease_ms`` (a partition, a front end gone) stops serving by
    itself: it starts no step and emits no token until a lease comes again. Because the
    front end fences a rank only ``heartbeat_timeout_ms`` after its last heartbeat arrived,
    a lease no longer than that timeout means an isolated rank has stopped before its
    requests are moved, so no request is ever served twice. None: ``heartbeat_timeout_ms``.
    Must be > ``heartbeat_interval_ms`` and <= ``heartbeat_timeout_ms``."""

    @property
    def lease_s(self) -> float:
        """The lease in seconds (``lease_ms``, or the heartbeat timeout when unset)."""
        return (self.heartbeat_timeout_ms if self.lease_ms is None else self.lease_ms) / 1000.0

    def validate(self, prefix: str) -> None:
        _check(self.heartbeat_interval_ms > 0, f"{prefix}.heartbeat_interval_ms",
               self.heartbeat_interval_ms, "must be > 0")
        _check(self.heartbeat_timeout_ms > self.heartbeat_interval_ms,
               f"{prefix}.heartbeat_timeout_ms", self.heartbeat_timeout_ms,
               f"must be > heartbeat_interval_ms ({self.heartbeat_interval_ms})")
        if self.lease_ms is not None:
            _check(self.lease_ms > self.heartbeat_interval_ms, f"{prefix}.lease_ms",
                   self.lease_ms, f"must be > heartbeat_interval_ms "
                                  f"({self.heartbeat_interval_ms}): a lease is renewed once "
                                  "per heartbeat")
            _check(self.lease_ms <= self.heartbeat_timeout_ms, f"{prefix}.lease_ms",
                   self.lease_ms, f"must be <= heartbeat_timeout_ms "
                                  f"({self.heartbeat_timeout_ms}): an isolated rank must stop "
                                  "before the front end moves its requests")


@dataclass(frozen=True)
class PlacementConfig:
    """Where logical experts and their replicas live."""

    redundant_slots_per_rank: int | None = None
    """Extra physical expert slots on each rank, filled with replicas of hot or exposed
    experts. None: the engine's default (the reference runtime: 1; vLLM: the full mirror,
    ``ceil(experts / ranks)``, so that every expert has two replicas). Fewer slots cost less
    memory; a death may then leave experts without a live replica until weight repair brings
    them back (``recovery.on_uncovered``)."""

    fault_aware: bool = True
    """Spread replicas of one expert over distinct ranks and nodes to maximise the chance that
    every expert keeps a live replica after failures. False: place by load alone."""

    max_balancedness_loss: float = 0.05
    """Fault-aware placement gives up at most this fraction of balancedness
    (mean rank load / max rank load) against load-only placement."""

    ranks_per_node: int = 8
    """Ranks that share a node (and fail together when the node does)."""

    def validate(self, prefix: str) -> None:
        _check(self.redundant_slots_per_rank is None or self.redundant_slots_per_rank >= 0,
               f"{prefix}.redundant_slots_per_rank", self.redundant_slots_per_rank,
               "must be >= 0 (or null: the engine's default)")
        _check(0.0 <= self.max_balancedness_loss < 1.0, f"{prefix}.max_balancedness_loss",
               self.max_balancedness_loss, "must be in [0, 1)")
        _check(self.ranks_per_node >= 1, f"{prefix}.ranks_per_node", self.ranks_per_node,
               "must be >= 1")


@dataclass(frozen=True)
class TransportConfig:
    """Dispatch/combine and control messages between ranks."""

    address: Literal["ipc", "tcp"] = "ipc"
    """``ipc``: Unix sockets in the instance's private directory (one host); ``tcp``: TCP,
    on 127.0.0.1 (one host) or, with ``node_addresses``, on each node's address (several
    hosts)."""

    node_addresses: tuple[str, ...] = ()
    """Several hosts: the address (IPv4 or host name) of each node, the front end's node
    first. Ranks go to the nodes node-major (ranks / nodes consecutive ranks each), every
    socket binds its node's address at a port derived from ``base_port``, and heartbeats and
    leases travel as authenticated UDP datagrams (a lost datagram costs nothing; a lost TCP
    segment stalls a heartbeat stream for 200 ms or more). Needs ``address: tcp``, a
    ``base_port`` and the instance key on every node (docs/multinode.md). Empty: one host."""

    base_port: int = 0
    """With ``node_addresses``: the first port of the instance's range on every node
    (the instance uses 3 ports per rank plus 1, from here; docs/multinode.md). 0: one host,
    ports picked free on 127.0.0.1."""

    key_file: str = ""
    """With ``node_addresses``: the instance key, one file at this absolute path on every
    node (mode 0600, owned by the user running the instance). The front end's node makes it
    when it is missing (the reference runtime's coordinator, vLLM's head); any other node
    refuses to start without it. Empty: the key is made in the instance's private directory
    (vLLM across nodes: copy that file to the same path on the other nodes)."""

    step_timeout_ms: float = 2000.0
    """Deadline of one dispatch or combine receive. A peer that misses it is suspected and
    the detector decides; nothing waits forever."""

    authenticate: bool = True
    """Tag every message of the instance with a per-instance key (HMAC-SHA256 of its header,
    the key in a file only the owner can read) and drop what does not carry it: a process
    outside the instance can neither inject data nor change membership. False: untagged."""

    curve: bool = True
    """With ``authenticate``: every socket also uses ZeroMQ's CURVE (keys derived from the
    instance key), so a process outside the instance cannot even connect, and every byte in
    flight is encrypted and authenticated (what a TCP transport between hosts needs). Where
    libzmq has no CURVE, the tag alone authenticates."""

    def validate(self, prefix: str) -> None:
        from .transport.addressing import check_host

        _check(self.step_timeout_ms > 0, f"{prefix}.step_timeout_ms", self.step_timeout_ms,
               "must be > 0")
        for i, host in enumerate(self.node_addresses):
            why = check_host(host)
            _check(why is None, f"{prefix}.node_addresses[{i}]", host, why or "")
        _check(len(set(self.node_addresses)) == len(self.node_addresses),
               f"{prefix}.node_addresses", list(self.node_addresses),
               "must not name a node twice")
        _check(self.base_port == 0 or 1024 <= self.base_port <= 65535, f"{prefix}.base_port",
               self.base_port, "must be 0 (one host) or a port in 1024..65535")
        _check(not self.key_file or self.key_file.startswith("/"), f"{prefix}.key_file",
               self.key_file, "must be an absolute path (the same on every node)")
        if self.node_addresses:
            _check(self.address == "tcp", f"{prefix}.address", self.address,
                   "must be 'tcp' when transport.node_addresses is set (Unix sockets do not "
                   "cross hosts)")
            _check(self.base_port != 0, f"{prefix}.base_port", self.base_port,
                   "must be set (1024..65535, the same on every node) when "
                   "transport.node_addresses is set")


@dataclass(frozen=True)
class KVCheckpointConfig:
    """Asynchronous, incremental checkpoints of running requests' KV blocks."""

    enabled: bool = True
    """Checkpoint KV blocks so a request whose rank dies resumes instead of re-prefilling."""

    interval_tokens: int = 16
    """Bound on the lag: a request's checkpoint never trails its KV cache by more tokens."""

    store: Literal["peer", "shm", "file"] = "peer"
    """``peer``: host memory of other ranks; ``shm``: local shared memory; ``file``: files
    (survive a host restart)."""

    replicas: int = 1
    """Copies of each checkpoint, on distinct stores/ranks."""

    path: str = ""
    """``file`` store only: directory for checkpoint files (default: a temp dir)."""

    timeout_ms: float = 2000.0
    """Deadline of one store call (save, metadata, fetch, delete); a store that does not answer
    in time is skipped (a save is retried with the next one, a restore tries the next replica)."""

    max_stall_ms: float = 100.0
    """Backpressure that keeps the lag bound: when a save has not landed by the time the cache
    would run more than ``interval_tokens`` ahead of the checkpoint, the decode loop waits for it,
    at most this long per step (then decoding goes on and the lag grows: a store that is down
    must not stop decoding). 0: never wait."""

    def validate(self, prefix: str) -> None:
        _check(self.interval_tokens >= 1, f"{prefix}.interval_tokens", self.interval_tokens,
               "must be >= 1")
        _check(self.replicas >= 1, f"{prefix}.replicas", self.replicas, "must be >= 1")
        _check(self.timeout_ms > 0, f"{prefix}.timeout_ms", self.timeout_ms, "must be > 0")
        _check(self.max_stall_ms >= 0, f"{prefix}.max_stall_ms", self.max_stall_ms, "must be >= 0")


@dataclass(frozen=True)
class ShadowConfig:
    """Shadow experts: copies of other ranks' experts kept in residual memory."""

    enabled: bool = False
    """Keep shadow copies of experts in extra slots of residual memory: never routed while
    the expert has a live regular replica; when it loses the last one, the shadow is taken
    into the routing tables (a table flip, no weight copy)."""

    memory_fraction: float = 0.1
    """Fraction of the residual memory per rank (device memory the engine leaves unused; on
    a CPU, the memory available to the process) that shadows may use."""

    max_slots_per_rank: int = 0
    """At most this many shadow slots per rank (0: as many as ``memory_fraction`` allows,
    never more than the experts a rank does not hold)."""

    def validate(self, prefix: str) -> None:
        _check(0.0 <= self.memory_fraction <= 1.0, f"{prefix}.memory_fraction",
               self.memory_fraction, "must be in [0, 1]")
        _check(self.max_slots_per_rank >= 0, f"{prefix}.max_slots_per_rank",
               self.max_slots_per_rank, "must be >= 0")


RepairSource = Literal["shadow", "peer", "host", "remote", "disk"]


@dataclass(frozen=True)
class RepairConfig:
    """Restoring coverage when an expert lost every live replica."""

    sources: tuple[RepairSource, ...] = ("shadow", "peer", "host", "remote", "disk")
    """Weight sources, cheapest first; the first that holds the expert is used."""

    host_backup: bool = False
    """Keep a host-memory copy of every expert, once per node (shared memory, filled when the
    weights are loaded), so that a dead rank's experts are repaired from memory instead of
    the model files on disk. Costs one copy of the routed-expert weights in host memory per
    node."""

    def validate(self, prefix: str) -> None:
        allowed = typing.get_args(RepairSource)
        for i, s in enumerate(self.sources):
            _check(s in allowed, f"{prefix}.sources[{i}]", s, f"must be one of {list(allowed)}")
        _check(len(self.sources) > 0, f"{prefix}.sources", list(self.sources),
               "must name at least one source")


@dataclass(frozen=True)
class RecoveryConfig:
    """What the instance does when a rank fails."""

    on_uncovered: Literal["wait", "degrade", "fail"] = "wait"
    """A token routed to an expert with no live replica: ``wait`` holds the token until weight
    repair brings the expert back (outputs stay exact; a wait longer than the step deadline
    degrades, counted); ``degrade`` drops that expert from the token's top-k and renormalises
    the rest (the output is no longer exact); ``fail`` finishes the request with an error that
    names the experts."""

    migrate_requests: bool = True
    """Move the dead rank's requests to survivors (resume from KV checkpoint or recompute)."""

    max_failures: int = 0
    """Stop serving once more than this many ranks are down at once (0: until one is left)."""

    readmit_fenced: bool = True
    """A rank fenced as hung that heartbeats again (it was only slow, or was resumed) is
    re-admitted with one table flip; its weights are still loaded. False: it stays out."""

    respawn: bool = False
    """Start a replacement for every lost rank as soon as it is lost; it rejoins without a
    restart of the others (vLLM: the front end starts a new engine core; see docs/vllm.md).
    Off: a lost rank stays out until ``POST /resilience/ranks/{rank}/rejoin``."""

    rejoin_start_timeout_s: float = 300.0
    """A replacement rank must be up (weights loaded, warmed up, compiled) this long after its
    process starts; one that is not is stopped and started once more, then the rejoin fails.
    Raise it for models whose weights take longer to load."""

    max_request_failures: int = 2
    """A request in flight at this many rank deaths is failed with an error instead of being
    moved again (a poison request that kills every rank it runs on must not take the
    instance down one rank at a time). 0: no limit."""

    def validate(self, prefix: str) -> None:
        _check(self.max_failures >= 0, f"{prefix}.max_failures", self.max_failures,
               "must be >= 0")
        _check(self.max_request_failures >= 0, f"{prefix}.max_request_failures",
               self.max_request_failures, "must be >= 0")
        _check(self.rejoin_start_timeout_s > 0, f"{prefix}.rejoin_start_timeout_s",
               self.rejoin_start_timeout_s, "must be > 0")


@dataclass(frozen=True)
class MetricsConfig:
    """What is recorded and where it is shown."""

    enabled: bool = True
    """Record per-step timings, stalls and recovery events."""

    timeline_path: str = ""
    """Write the per-step timeline as JSON lines here (empty: keep in memory only; writing is
    not built yet: refused)."""


@dataclass(frozen=True)
class ResilienceConfig:
    """The whole resilience layer. ``enabled=False`` is a no-op."""

    enabled: bool = True
    """Master switch."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    """Failure detection (crash and hang)."""

    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Expert placement with replicas."""

    transport: TransportConfig = field(default_factory=TransportConfig)
    """Dispatch/combine transport."""

    kv_checkpoint: KVCheckpointConfig = field(default_factory=KVCheckpointConfig)
    """KV-cache checkpointing."""

    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    """Shadow experts."""

    repair: RepairConfig = field(default_factory=RepairConfig)
    """Weight repair."""

    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    """Recovery policy."""

    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Metrics and timelines."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            validate = getattr(section, "validate", None)
            if validate is not None:
                validate(f.name)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ResilienceConfig":
        """Build from a plain dict (YAML, JSON, ``--additional-config``). Unknown keys,
        wrong types and impossible values raise :class:`ConfigError`."""
        if data is None:
            return cls()
        return build(cls, data, root="resilience", error=ConfigError)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ResilienceConfig":
        """Load a YAML file; a top-level ``resilience:`` key is accepted and unwrapped."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError("resilience_config", str(path), f"cannot read file ({e.strerror})")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("resilience_config", str(path), f"invalid YAML ({e})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("resilience_config", str(path), "top level must be a mapping")
        if set(data) == {"resilience"}:
            data = data["resilience"] or {}
        return cls.from_dict(data)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "ResilienceConfig":
        """Apply ``dotted.key=value`` strings (values parsed as YAML scalars)."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError("override", item, "must look like key.sub=value")
            key, raw = item.split("=", 1)
            key = key.strip()
            parts = key.split(".")
            if not all(p.strip() for p in parts):
                raise ConfigError("override", item, "must look like key.sub=value")
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(key, raw, f"not a YAML value ({str(e).splitlines()[0]})") from None
            node = data
            for depth, part in enumerate(parts[:-1]):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(".".join(parts[: depth + 1]), item, "unknown section")
                node = node[part]
            node[parts[-1]] = value
        return ResilienceConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), the inverse of :meth:`from_dict`."""
        return to_plain(self)


NOT_BUILT: dict[str, str] = {
    "metrics": "metrics settings are not built yet (timings are recorded in memory)",
}
"""Keys no engine implements yet; any value but the default is refused, on every engine."""


def changed_keys(cfg: ResilienceConfig) -> dict[str, Any]:
    """The dotted leaf keys of ``cfg`` whose value differs from the default."""
    def leaves(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(leaves(v, key + "."))
            else:
                out[key] = v
        return out

    mine, default = leaves(cfg.to_dict()), leaves(ResilienceConfig().to_dict())
    return {k: v for k, v in mine.items() if default.get(k) != v}


def refuse_unsupported(cfg: ResilienceConfig, engine: str,
                       unsupported: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` for the first key set away from its default that ``engine``
    does not implement (``unsupported``: dotted key or section -> why; :data:`NOT_BUILT`
    always applies). Every engine calls this at start, so no setting is silently ignored."""
    table = {**NOT_BUILT, **(unsupported or {})}
    for key, value in changed_keys(cfg).items():
        for prefix, why in table.items():
            if key == prefix or key.startswith(prefix + "."):
                raise ConfigError(key, value, f"is not supported on {engine} ({why}); "
                                              f"leave it at its default")
