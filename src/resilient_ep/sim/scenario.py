"""Simulator scenarios: YAML -> nested frozen dataclasses, one docstring per field.

The minimal scenario names four things::

    seed: 0
    ranks: 32
    duration_s: 600
    failures: [{time_s: 120, rank: 5, kind: crash}]

Everything else has a default: a DeepSeek-V3-like model (58 MoE layers x 256 experts of
44 MB in FP8, 17 GB of replicated dense weights, MLA KV of 70 KB per token) served with
colocated attention-DP + EP on H100-class nodes of 8 GPUs.

Glossary
  rank        one GPU process of the EP instance: an attention DP worker and an expert worker.
  node        ``hardware.gpus_per_node`` consecutive ranks; a node failure takes all of them.
  slot        a place for one expert's weights on a rank (``ceil(E/R)`` primaries plus
              ``model.redundant_slots_per_rank`` replicas).
  stall       from a failure until every surviving request makes progress again.
  goodput     output tokens generated per second, recomputation excluded.

Every error is a :class:`ScenarioError` naming the dotted key and the value, for example
``workload.load_factor: must be > 0, got -1``; an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..schema import FieldError, build, to_plain

__all__ = [
    "ScenarioError",
    "FailureSpec",
    "ModelSpec",
    "HardwareSpec",
    "TimingSpec",
    "WorkloadSpec",
    "DetectionSpec",
    "GeneratedFailuresSpec",
    "RestartSpec",
    "FullRestartSpec",
    "MaskAndRepairSpec",
    "ShadowKVSpec",
    "ResilientEPSpec",
    "PoliciesSpec",
    "SimSpec",
    "Scenario",
    "POLICY_NAMES",
    "RepairSource",
]

POLICY_NAMES = ("full_restart", "mask_and_repair", "shadow_kv", "resilient_ep")

RepairSource = Literal["shadow", "peer", "host", "remote", "disk"]
"""Where weights come from, cheapest first: ``shadow`` (a copy already in some live GPU's
memory), ``peer`` (another GPU in the same node, NVLink), ``host`` (host-memory backup,
PCIe), ``remote`` (another node's host memory, RDMA), ``disk`` (the node's storage)."""


class ScenarioError(FieldError):
    """A scenario key is unknown, of the wrong type or impossible.

    ``field`` is the dotted key (``failures[2].rank``), ``value`` what was given.
    """


def _check(cond: bool, field: str, value: Any, reason: str) -> None:
    if not cond:
        raise ScenarioError(field, value, reason)


def _positive(obj: Any, prefix: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if allow_zero:
            _check(v >= 0, f"{prefix}.{name}", v, "must be >= 0")
        else:
            _check(v > 0, f"{prefix}.{name}", v, "must be > 0")


# ----------------------------------------------------------------------------- failures
@dataclass(frozen=True)
class FailureSpec:
    """One entry of the failure trace."""

    time_s: float
    """Simulated time of the event, in [0, duration_s)."""

    rank: int
    """The rank it happens to, in [0, ranks)."""

    kind: Literal["crash", "hang", "recover"] = "crash"
    """``crash``: the process dies and its connections drop (seen by connection loss).
    ``hang``: the process stops answering with its connections open (seen by heartbeat
    timeout). ``recover``: the rank's GPU is usable again after a hardware fault; without one,
    a failed rank can be relaunched on its GPU right after detection."""


# ------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelSpec:
    """The MoE model (defaults: DeepSeek-V3, FP8 experts)."""

    name: str = "deepseek-v3"
    """Free-form label shown in reports."""

    moe_layers: int = 58
    """Layers with routed experts (DeepSeek-V3: 61 layers, the first 3 dense)."""

    total_layers: int = 61
    """All transformer layers (attention runs in every one)."""

    num_experts: int = 256
    """Routed experts per MoE layer."""

    experts_per_token: int = 8
    """Routed experts each token visits (top-k)."""

    hidden_size: int = 7168
    """Model width; sets the bytes that dispatch and combine move per token."""

    expert_mb: float = 44.0
    """Weights of one routed expert in MB (DeepSeek-V3: 3 x 7168 x 2048 FP8 = 44 MB)."""

    dense_gb: float = 17.0
    """Non-expert weights every rank holds (attention, shared expert, dense layers,
    embeddings), GB."""

    kv_kb_per_token: float = 70.0
    """KV cache per token in KB (DeepSeek-V3 MLA: 61 x 576 x 2 bytes)."""

    redundant_slots_per_rank: int = 1
    """Expert slots per rank beyond ``ceil(num_experts / ranks)``, filled with replicas."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "moe_layers", "total_layers", "num_experts", "experts_per_token",
                  "hidden_size", "expert_mb", "kv_kb_per_token")
        _positive(self, prefix, "dense_gb", "redundant_slots_per_rank", allow_zero=True)
        _check(self.moe_layers <= self.total_layers, f"{prefix}.moe_layers", self.moe_layers,
               f"must be <= total_layers ({self.total_layers})")
        _check(self.experts_per_token <= self.num_experts, f"{prefix}.experts_per_token",
               self.experts_per_token, f"must be <= num_experts ({self.num_experts})")


@dataclass(frozen=True)
class HardwareSpec:
    """GPUs, links and storage (defaults: H100 SXM nodes, 8 GPUs, 400 Gb/s NIC per GPU)."""

    gpus_per_node: int = 8
    """Ranks per node; ``ranks`` must be a multiple of it."""

    nvlink_gbps: float = 400.0
    """GPU-to-GPU bandwidth inside a node, GB/s per GPU per direction (NVLink 4: 450 nominal)."""

    rdma_gbps: float = 45.0
    """Inter-node bandwidth per GPU, GB/s (a 400 Gb/s NIC per GPU, ~90 % achievable)."""

    pcie_gbps: float = 50.0
    """Host-to-GPU copy bandwidth per GPU, GB/s (PCIe 5 x16)."""

    disk_gbps_per_node: float = 2.0
    """Weight-loading bandwidth from storage, GB/s per node, shared by the node's ranks
    that load at the same time."""

    transfer_setup_s: float = 0.05
    """Fixed cost of one repair transfer (registration, handshake), seconds."""

    shadow_activate_s: float = 0.002
    """Cost of activating a shadow copy already in GPU memory (a routing-table write)."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "gpus_per_node", "nvlink_gbps", "rdma_gbps", "pcie_gbps",
                  "disk_gbps_per_node")
        _positive(self, prefix, "transfer_setup_s", "shadow_activate_s", allow_zero=True)


@dataclass(frozen=True)
class TimingSpec:
    """Per-step time model of one decode step (see ``sim/timing.py``)."""

    layer_fixed_us: float = 30.0
    """Per-layer cost independent of batch (kernel launches, norms, gate), microseconds."""

    attention_us_per_token: float = 2.0
    """Attention (MLA decode) per sequence per layer on one rank, microseconds."""

    expert_us_per_token: float = 0.2
    """Routed-expert GEMM per (token, expert) pair per layer on one rank, microseconds."""

    dispatch_latency_us: float = 40.0
    """Fixed latency of one dispatch all-to-all per layer, microseconds."""

    combine_latency_us: float = 40.0
    """Fixed latency of one combine all-to-all per layer, microseconds."""

    dispatch_bytes_per_elem: float = 1.0
    """Bytes per hidden element sent by dispatch (FP8)."""

    combine_bytes_per_elem: float = 2.0
    """Bytes per hidden element returned by combine (BF16)."""

    step_overhead_ms: float = 2.0
    """Per-step cost outside the layers (sampling, scheduling), milliseconds."""

    prefill_us_per_token: float = 60.0
    """Prefill (and recomputation) cost per token on one rank, microseconds."""

    load_imbalance: float = 1.15
    """Max over mean expert load per rank with the serving layout before any failure
    (1.0 = perfect balance; EPLB-balanced DeepSeek-V3 serving is ~1.1-1.2)."""

    expert_skew: float = 0.8
    """Zipf exponent of the expert popularity used to build the load tensor that placement
    sees (0 = uniform)."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "layer_fixed_us", "attention_us_per_token",
                  "expert_us_per_token", "dispatch_latency_us", "combine_latency_us",
                  "dispatch_bytes_per_elem", "combine_bytes_per_elem", "step_overhead_ms",
                  "prefill_us_per_token", "expert_skew", allow_zero=True)
        _check(self.load_imbalance >= 1.0, f"{prefix}.load_imbalance", self.load_imbalance,
               "must be >= 1.0 (max over mean)")


@dataclass(frozen=True)
class WorkloadSpec:
    """The request stream (Poisson arrivals, geometric output lengths)."""

    load_factor: float = 0.9
    """Arrival rate as a fraction of the instance's nominal capacity with all ranks
    (> 1 saturates it, as a throughput benchmark does)."""

    prompt_tokens: int = 1024
    """Prompt length of every request."""

    output_tokens: int = 1024
    """Mean output length (geometric)."""

    max_batch_per_rank: int = 128
    """Sequences one rank decodes at once (its KV-cache capacity). Restored requests may
    exceed it until they finish."""

    request_timeout_s: float = 120.0
    """A request still queued after this long is given up by its client (counted lost)."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "load_factor", "prompt_tokens", "output_tokens",
                  "max_batch_per_rank", "request_timeout_s")


@dataclass(frozen=True)
class DetectionSpec:
    """How long a failure goes unseen (the whole instance is blocked meanwhile)."""

    crash_s: float = 0.5
    """Crash seen through connection loss (socket/QP error, launcher), seconds."""

    heartbeat_timeout_s: float = 3.0
    """Hang seen when heartbeats stop for this long, seconds."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "crash_s", "heartbeat_timeout_s", allow_zero=True)


@dataclass(frozen=True)
class GeneratedFailuresSpec:
    """Random failures on top of the trace (off by default)."""

    rank_mtbf_h: float = 0.0
    """Mean time between failures of one rank, hours (exponential); 0 turns it off."""

    hang_fraction: float = 0.2
    """Fraction of generated rank failures that are hangs rather than crashes."""

    rank_repair_s: float = 0.0
    """Hardware downtime after a generated rank failure (0: the rank can be relaunched at
    once, a software fault)."""

    node_mtbf_h: float = 0.0
    """Mean time between failures of one node (all its ranks crash together), hours;
    0 turns it off."""

    node_repair_s: float = 1800.0
    """Hardware downtime after a node failure, seconds (a ``recover`` event ends it)."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "rank_mtbf_h", "rank_repair_s", "node_mtbf_h", "node_repair_s",
                  allow_zero=True)
        _check(0.0 <= self.hang_fraction <= 1.0, f"{prefix}.hang_fraction", self.hang_fraction,
               "must be in [0, 1]")


@dataclass(frozen=True)
class RestartSpec:
    """Costs of (re)starting rank processes, shared by every policy."""

    process_start_s: float = 15.0
    """Spawning the worker process, importing the engine, creating the CUDA context."""

    dist_init_s: float = 10.0
    """Building communicators and EP buffers for the whole instance (full restart only)."""

    graph_capture_s: float = 20.0
    """Capturing CUDA graphs and warming kernels on a (re)started rank."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "process_start_s", "dist_init_s", "graph_capture_s",
                  allow_zero=True)


# ----------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class FullRestartSpec:
    """Fixed membership: any failure restarts every rank (``policies/full_restart.py``)."""

    enabled: bool = True
    """Run this policy."""

    teardown_s: float = 15.0
    """Stopping every surviving process and freeing the GPUs after detection."""

    weights_source: RepairSource = "disk"
    """Where the restarted ranks load their weights from."""

    queue_during_restart: bool = False
    """True: the front end stays up and queues arrivals during the restart; False: it
    restarts too and arrivals meanwhile are refused (lost). In-flight requests are kept by the
    router either way and re-prefilled."""

    warmup_s: float = 10.0
    """Health checks and the first batches after the restart, before serving resumes."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "teardown_s", "warmup_s", allow_zero=True)


@dataclass(frozen=True)
class MaskAndRepairSpec:
    """EEP: shrink membership, repair coverage, pause to reintegrate
    (``policies/mask_and_repair.py``)."""

    enabled: bool = True
    """Run this policy."""

    shrink_s: float = 8.0
    """Fencing the dead rank, patching communicator membership and routing tables after
    detection (the instance is paused)."""

    repair_source: RepairSource = "host"
    """Where weights of experts that lost every replica are copied from (paused)."""

    rejoin_weights_source: RepairSource = "disk"
    """Where the relaunched rank loads its weights from (in the background)."""

    reintegration_pause_s: float = 8.0
    """Pause of the healthy ranks while the relaunched rank is admitted."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "shrink_s", "reintegration_pause_s", allow_zero=True)


@dataclass(frozen=True)
class ShadowKVSpec:
    """Tarragon: shadow experts and per-request KV restore (``policies/shadow_kv.py``)."""

    enabled: bool = True
    """Run this policy."""

    reroute_s: float = 0.05
    """Updating the expert routing table and resubmitting the step after detection."""

    shadow_spread_ranks: int = 1
    """A rank's experts are shadowed on the next this-many ranks (same node first); they
    absorb its load after a failure."""

    kv_checkpoint_interval_tokens: int = 16
    """KV is checkpointed every this-many decoded tokens; a restored request recomputes on
    average half an interval."""

    kv_restore_source: RepairSource = "remote"
    """Where KV checkpoints are restored from (``remote``: another node's host memory)."""

    rejoin_weights_source: RepairSource = "host"
    """Where a relaunched rank loads its weights from (in the background)."""

    reintegration_pause_s: float = 0.5
    """Pause while the routing table takes the relaunched rank back."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "reroute_s", "reintegration_pause_s", allow_zero=True)
        _positive(self, prefix, "shadow_spread_ranks", "kv_checkpoint_interval_tokens")
        _check(self.kv_restore_source in ("host", "remote", "disk"),
               f"{prefix}.kv_restore_source", self.kv_restore_source,
               "must be host, remote or disk")


@dataclass(frozen=True)
class ResilientEPSpec:
    """This project: fault-aware placement, replan, tiered repair, checkpointed KV,
    pause-free reintegration (``policies/resilient_ep.py``)."""

    enabled: bool = True
    """Run this policy."""

    reroute_s: float = 0.01
    """Fence + ``replan`` + one table flip after detection."""

    shadow_slots_per_rank: int | None = None
    """Extra expert slots per rank in residual GPU memory, handed to the core placement as
    replica slots on top of the model's. None: the residual memory ``shadow_kv``'s shadows
    take, ``policies.shadow_kv.shadow_spread_ranks x slots_per_rank``, so that both policies
    spend the same memory."""

    placement_layers: int = 4
    """MoE layers handed to the core placement (the others repeat them: uncovered experts
    and copies scale by ``moe_layers / placement_layers``). Keeps 1024-rank runs fast."""

    on_uncovered: Literal["degrade", "wait"] = "degrade"
    """While an expert has no live replica: ``degrade`` (the project's default,
    ``recovery.on_uncovered``) serves at once, dropping it from tokens' top-k until its weights
    are copied back (counted in ``details.inexact_s``); ``wait`` holds every rank until coverage
    is restored (coverage before speed)."""

    repair_sources: tuple[RepairSource, ...] = ("shadow", "peer", "host", "remote", "disk")
    """Sources tried in order for experts that lost every live replica."""

    kv_checkpoint_interval_tokens: int = 16
    """KV is checkpointed every this-many decoded tokens (async, incremental)."""

    kv_restore_source: RepairSource = "remote"
    """Where KV checkpoints are restored from."""

    rejoin_weights_source: RepairSource = "peer"
    """Where a relaunched rank loads its weights from (in the background)."""

    reintegration_flip_s: float = 0.005
    """The one table flip between two steps that admits a repaired rank."""

    rebalance_moves: int = 0
    """Per layer, replica copies from the hottest to the coolest surviving rank after a failure
    (``placement.replan(rebalance_moves=...)``), copied from a surviving replica over the
    peer link in the background. 0: keep the lost rank's load on the replicas that were there."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "reroute_s", "reintegration_flip_s", allow_zero=True)
        _positive(self, prefix, "rebalance_moves", allow_zero=True)
        if self.shadow_slots_per_rank is not None:
            _positive(self, prefix, "shadow_slots_per_rank", allow_zero=True)
        _positive(self, prefix, "placement_layers", "kv_checkpoint_interval_tokens")
        _check(len(self.repair_sources) > 0, f"{prefix}.repair_sources", self.repair_sources,
               "must name at least one source")
        _check(self.kv_restore_source in ("host", "remote", "disk"),
               f"{prefix}.kv_restore_source", self.kv_restore_source,
               "must be host, remote or disk")


@dataclass(frozen=True)
class PoliciesSpec:
    """Parameters of each policy; ``enabled: false`` leaves one out of the run."""

    full_restart: FullRestartSpec = field(default_factory=FullRestartSpec)
    """Fixed membership, restart everything."""

    mask_and_repair: MaskAndRepairSpec = field(default_factory=MaskAndRepairSpec)
    """EEP-style elastic membership."""

    shadow_kv: ShadowKVSpec = field(default_factory=ShadowKVSpec)
    """Tarragon-style shadows and KV checkpoints."""

    resilient_ep: ResilientEPSpec = field(default_factory=ResilientEPSpec)
    """This project's policy."""

    def enabled(self) -> list[str]:
        """Names of the enabled policies, in report order."""
        return [n for n in POLICY_NAMES if getattr(self, n).enabled]

    def validate(self, prefix: str) -> None:
        for n in POLICY_NAMES:
            getattr(self, n).validate(f"{prefix}.{n}")


@dataclass(frozen=True)
class SimSpec:
    """Simulation mechanics and metric definitions."""

    time_slice_s: float = 1.0
    """The instance advances in slices of at most this long (state changes split them)."""

    goodput_bin_s: float = 1.0
    """Width of one point of the goodput time series."""

    baseline_start_s: float = 10.0
    """Pre-fault goodput is the mean over [baseline_start_s, first failure)."""

    smoothing_s: float = 5.0
    """Centered moving-average window applied before the 95 % test."""

    sustain_s: float = 30.0
    """Goodput must stay >= 95 % of pre-fault this long (or to the end) to count as back."""

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "time_slice_s", "goodput_bin_s")
        _positive(self, prefix, "baseline_start_s", "smoothing_s", "sustain_s", allow_zero=True)


# ----------------------------------------------------------------------------- scenario
@dataclass(frozen=True)
class Scenario:
    """One simulated EP instance, its workload and its failures."""

    seed: int
    """Seed of every random draw (arrivals, generated failures, expert load)."""

    ranks: int
    """EP ranks of the instance (1 to 4096)."""

    duration_s: float
    """Simulated time, seconds."""

    failures: tuple[FailureSpec, ...] = ()
    """The failure trace, in any order."""

    name: str = ""
    """Free-form label shown in reports (defaults to the file name)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The MoE model."""

    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    """GPUs, links, storage."""

    timing: TimingSpec = field(default_factory=TimingSpec)
    """The per-step time model."""

    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    """The request stream."""

    detection: DetectionSpec = field(default_factory=DetectionSpec)
    """Failure detection delays by kind."""

    generated: GeneratedFailuresSpec = field(default_factory=GeneratedFailuresSpec)
    """Random failures added to the trace."""

    restart: RestartSpec = field(default_factory=RestartSpec)
    """Process (re)start costs."""

    policies: PoliciesSpec = field(default_factory=PoliciesSpec)
    """The policies compared and their parameters."""

    sim: SimSpec = field(default_factory=SimSpec)
    """Simulation mechanics."""

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int), "seed", self.seed, "must be an integer")
        _check(1 <= self.ranks <= 4096, "ranks", self.ranks, "must be in [1, 4096]")
        _check(self.duration_s > 0, "duration_s", self.duration_s, "must be > 0")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "validate"):
                v.validate(f.name)
        g = self.hardware.gpus_per_node
        _check(self.ranks % g == 0 or self.ranks < g, "ranks", self.ranks,
               f"must be a multiple of hardware.gpus_per_node ({g}) or smaller than it")
        _check(self.model.num_experts * self.model.experts_per_token > 0, "model", self.model,
               "needs experts")
        for i, f in enumerate(self.failures):
            where = f"failures[{i}]"
            _check(0.0 <= f.time_s < self.duration_s, f"{where}.time_s", f.time_s,
                   f"must be in [0, duration_s={self.duration_s})")
            _check(0 <= f.rank < self.ranks, f"{where}.rank", f.rank,
                   f"must be in [0, ranks={self.ranks})")
        _check(len(self.policies.enabled()) > 0, "policies", "all disabled",
               "at least one policy must be enabled")

    # ------------------------------------------------------------------ derived values
    @property
    def nodes(self) -> int:
        return max(1, self.ranks // self.hardware.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        return min(self.ranks, self.hardware.gpus_per_node)

    @property
    def slots_per_rank(self) -> int:
        return math.ceil(self.model.num_experts / self.ranks) + self.model.redundant_slots_per_rank

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @property
    def rank_weight_bytes(self) -> float:
        """Bytes one rank loads on (re)start: dense weights plus its expert slots."""
        m = self.model
        return m.dense_gb * 1e9 + self.slots_per_rank * m.moe_layers * m.expert_mb * 1e6

    # ------------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, data: Any, *, name: str = "") -> "Scenario":
        """Build from a plain mapping. Unknown keys, wrong types and impossible values raise
        :class:`ScenarioError` naming the dotted key."""
        if not isinstance(data, dict):
            raise ScenarioError("scenario", data, "top level must be a mapping")
        missing = [k for k in ("seed", "ranks", "duration_s") if k not in data]
        if missing:
            raise ScenarioError(missing[0], None, "is required")
        data = dict(data)
        if name and "name" not in data:
            data["name"] = name
        return build(cls, data, root="scenario", error=ScenarioError)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Scenario":
        """Load a scenario file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ScenarioError("scenario", str(path), f"cannot read file ({e.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ScenarioError("scenario", str(path), f"invalid YAML ({e})") from None
        if data is None:
            raise ScenarioError("scenario", str(path), "file is empty")
        return cls.from_dict(data, name=path.stem)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), the inverse of :meth:`from_dict`."""
        return to_plain(self)
