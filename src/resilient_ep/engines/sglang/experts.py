"""Experts on SGLang: the core's placement in SGLang's ``ExpertLocationMetadata``, and the
routing table rewritten in place when a rank dies.

- **Placement** (front end, before SGLang resolves its arguments: :func:`launch_settings`).
  The core's :class:`~resilient_ep.expert_plan.ExpertPlan` with the full mirror (every
  logical expert on two ranks, ``2 * ceil(E / N)`` slots per rank) becomes SGLang's own
  switches: ``ep_num_redundant_experts = N * S - E`` physical slots beyond the logical
  experts, ``init_expert_location`` = the plan's ``physical_to_logical_map`` (every MoE
  layer alike), and ``ep_dispatch_algorithm = dynamic`` (SGLang's rank-invariant replica pick,
  which it requires without an all-to-all backend). SGLang's weight loader then fills every
  slot from the model files, as for its own EPLB.
- **Active map** (each scheduler: :class:`ActiveMap`). Without an all-to-all backend every
  EP rank runs the MoE over all gathered tokens and the ranks' partial outputs are summed, so
  each logical expert must be computed by exactly one live rank. The core picks that copy
  (:func:`resilient_ep.active_experts.active_slots`); we write it into SGLang's tables in
  place: ``logical_to_all_physical_map[:, e, 0]`` = the active slot, the other columns -1,
  ``logical_to_all_physical_map_num_valid = 1`` (SGLang's dispatch then always takes column
  0). Every rank computes the same table from the same membership, with no message; the
  tensors never move (``copy_``), so anything that captured them reads the new layout.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import torch

from resilient_ep.active_experts import active_slots, uncovered_experts
from resilient_ep.config import ConfigError, ResilienceConfig
from resilient_ep.expert_plan import ExpertPlan

__all__ = ["num_routed_experts", "plan_for", "launch_settings", "ActiveMap", "current",
           "install"]

log = logging.getLogger(__name__)


def num_routed_experts(hf_config: Any) -> int:
    """Routed experts of a Hugging Face MoE config (Qwen-MoE, DeepSeek, Mixtral names)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    for name in ("num_experts", "n_routed_experts", "num_local_experts"):
        n = getattr(text, name, None)
        if n:
            return int(n)
    return 0


def plan_for(num_experts: int, ep_size: int, cfg: ResilienceConfig | None = None) -> ExpertPlan:
    """The instance's plan: the full mirror over ``ep_size`` ranks (the same in every process:
    placement is a pure function of these inputs)."""
    return ExpertPlan(num_experts, ep_size, cfg or ResilienceConfig())


def physical_to_logical(plan: ExpertPlan, num_layers: int) -> list[list[int]]:
    """[L][P] the plan's slot -> expert map, every MoE layer alike."""
    row = plan.layout.physical_to_logical[0].tolist()
    return [list(row) for _ in range(num_layers)]


def launch_settings(hf_config: Any, ep_size: int, cfg: ResilienceConfig,
                    given: dict[str, Any]) -> dict[str, Any]:
    """SGLang arguments that put the core's placement in place (see the module docstring).
    ``given``: what the user set for them; a value other than SGLang's default is refused
    (the placement is ours), naming the argument."""
    E = num_routed_experts(hf_config)
    if E == 0:
        raise ConfigError("model", getattr(hf_config, "model_type", "?"),
                          "has no routed experts: the failover path is for MoE models")
    L = int(getattr(getattr(hf_config, "text_config", None) or hf_config, "num_hidden_layers"))
    defaults = {"ep_num_redundant_experts": 0, "init_expert_location": "trivial",
                "ep_dispatch_algorithm": None, "enable_eplb": False}
    for name, default in defaults.items():
        if given.get(name, default) != default:
            raise ConfigError(name, given[name], "is set, but with resilience on the core places "
                              "the experts (the full mirror): leave it unset")
    plan = plan_for(E, ep_size, cfg)
    P = plan.layout.num_slots
    return {
        "ep_num_redundant_experts": P - E,
        "init_expert_location": json.dumps({"physical_to_logical_map":
                                            physical_to_logical(plan, L)}),
        "ep_dispatch_algorithm": "dynamic",
    }


class ActiveMap:
    """One scheduler's view of SGLang's expert tables (``ExpertLocationMetadata``): which
    physical slot computes each logical expert, for the live ranks."""

    def __init__(self, metadata: Any, plan: ExpertPlan, num_ranks: int):
        self.metadata = metadata
        self.plan = plan
        self.num_ranks = num_ranks
        L, E, X = metadata.logical_to_all_physical_map.shape
        if E != plan.E or metadata.num_physical_experts != plan.layout.num_slots:
            raise ConfigError("ep_num_redundant_experts", metadata.num_physical_experts - E,
                              f"SGLang holds {metadata.num_physical_experts} physical slots for "
                              f"{E} experts; the core's plan has {plan.layout.num_slots} for "
                              f"{plan.E}")
        p2l = metadata.physical_to_logical_map_cpu[0]
        if p2l.tolist() != plan.layout.physical_to_logical[0].tolist():
            raise ConfigError("init_expert_location", "?", "SGLang's physical_to_logical_map "
                              "is not the core's plan")
        self.num_layers = L
        self.dead: frozenset[int] = frozenset()
        self._lock = threading.Lock()
        self.writes = 0
        self.set_dead(frozenset())

    def active(self) -> torch.Tensor:
        """[E] the slot computing each expert now (-1: no live copy)."""
        live = torch.ones(self.num_ranks, dtype=torch.bool)
        for r in self.dead:
            live[r] = False
        return active_slots(self.plan.layout, live)[0]

    def set_dead(self, dead) -> None:
        """Rewrite the tables for this set of dead ranks (in place; idempotent)."""
        with self._lock:
            self.dead = frozenset(int(r) for r in dead)
            act = self.active()  # [E]
            m = self.metadata
            L, E, X = m.logical_to_all_physical_map.shape
            table = torch.full((L, E, X), -1, dtype=m.logical_to_all_physical_map.dtype)
            table[:, :, 0] = act.to(table.dtype)
            valid = torch.ones((L, E), dtype=m.logical_to_all_physical_map_num_valid.dtype)
            m.logical_to_all_physical_map.copy_(table)
            m.logical_to_all_physical_map_cpu.copy_(table)
            m.logical_to_all_physical_map_num_valid.copy_(valid)
            self.writes += 1
        missing = uncovered_experts(act.unsqueeze(0))
        if missing:
            log.error("resilient-ep: expert(s) %s have no live copy (dead ranks %s)",
                      [e for _, e in missing], sorted(self.dead))

    def local_experts(self, rank: int) -> list[int]:
        """The logical experts ``rank`` holds (every copy, active or not)."""
        S = self.plan.slots_per_rank
        row = self.plan.layout.physical_to_logical[0, rank * S:(rank + 1) * S].tolist()
        return [int(e) for e in row if e >= 0]

    def status(self) -> dict[str, Any]:
        act = self.active()
        return {"active": act.tolist(), "dead": sorted(self.dead), "writes": self.writes,
                "uncovered": [e for _, e in uncovered_experts(act.unsqueeze(0))]}


_current: ActiveMap | None = None


def current() -> ActiveMap | None:
    return _current


def install(metadata: Any, num_ranks: int, cfg: ResilienceConfig) -> ActiveMap:
    """This scheduler's active map over SGLang's metadata (once)."""
    global _current
    if _current is None or _current.metadata is not metadata:
        plan = plan_for(int(metadata.num_logical_experts), num_ranks, cfg)
        _current = ActiveMap(metadata, plan, num_ranks)
    return _current
