"""This project's policy, on the core's own placement code (``resilient_ep.placement``).

- Layout: ``placement.place(load, fault_aware=True)`` over ``placement_layers`` layers of a
  Zipf expert load, on the model's slots plus ``shadow_slots_per_rank`` in residual memory;
  its cost in balance against ``placement.place_by_load`` (what the baselines run) scales
  ``timing.load_imbalance``. Per-rank loads come from the core's
  ``ExpertLayout.rank_load`` restricted to live ranks.
- Failure: the instance blocks until detection, then fence + ``replan`` + one table flip
  (``reroute_s``). Experts in ``replan(...).uncovered`` are copied from the cheapest source in
  ``repair_sources`` that can hold a copy of an expert with no live replica (host, remote,
  disk). With ``on_uncovered: degrade`` (the project's default) serving resumes at once and
  the output is inexact until the copies land (``details.inexact_s``); with ``wait`` serving
  resumes after them. If ``replan`` reports experts it cannot give a slot (more lost experts
  than live slots), ``degrade`` serves inexact until a rank rejoins and ``wait`` stays blocked.
- ``details`` reports the layout's robustness from the core's estimators:
  ``survival_probability`` after 1 and 2 random rank failures, ``node_failure_survival``.
- Requests of the dead rank are restored from KV checkpoints (as ``shadow_kv``).
- The rank is relaunched in the background, loads its weights from ``rejoin_weights_source``
  and is admitted with one table flip (``reintegration_flip_s``).
"""

from __future__ import annotations

import numpy as np
import torch

from resilient_ep.placement import (node_failure_survival, place, place_by_load, replan,
                                    survival_probability)
from resilient_ep.sim import repair
from resilient_ep.sim.engine import FailureRecord, Stranded
from resilient_ep.sim.failures import FailureEvent
from resilient_ep.sim.policies.base import Policy
from resilient_ep.sim.timing import expert_load

__all__ = ["ResilientEP"]

_NO_LIVE_COPY_SOURCES = ("host", "remote", "disk")


class ResilientEP(Policy):
    name = "resilient_ep"

    def setup(self) -> None:
        sc, m = self.sc, self.sc.model
        self.spec = sc.policies.resilient_ep
        L = min(self.spec.placement_layers, m.moe_layers)
        self.layer_scale = m.moe_layers / L
        self.load = torch.from_numpy(expert_load(sc, L, np.random.default_rng([sc.seed, 3])))
        shadows = self.spec.shadow_slots_per_rank
        if shadows is None:
            shadows = sc.policies.shadow_kv.shadow_spread_ranks * sc.slots_per_rank
        sizes = dict(num_layers=L, num_experts=m.num_experts, num_ranks=sc.ranks,
                     slots_per_rank=sc.slots_per_rank + shadows)
        self.base_layout = place(self.load, num_nodes=sc.nodes, fault_aware=True, **sizes)
        self.layout = self.base_layout
        all_live = np.ones(sc.ranks, dtype=bool)
        self.ref_imbalance = self._imbalance(place_by_load(self.load, **sizes), all_live)
        self.inst.imbalance_override = self._scaled(self.layout)
        self._held: list = []
        self._inexact_since: float | None = None
        self._inexact_s = 0.0
        self._unrepairable = False
        sources = [s for s in self.spec.repair_sources if s in _NO_LIVE_COPY_SOURCES]
        self.repair_source = sources[0] if sources else "disk"
        self.weight_copies = 0.0
        ex = self.inst.extras
        ex["placement_imbalance_vs_load_only"] = round(
            self._imbalance(self.layout, all_live) / self.ref_imbalance, 4)
        # How robust the layout is, from the core's estimators (over placement_layers).
        for f in (1, 2):
            if f < sc.ranks:
                est = survival_probability(self.layout, f, num_nodes=sc.nodes, samples=2000,
                                           seed=sc.seed)
                ex[f"survival_p_{f}_rank_failures"] = round(est.p, 4)
        ex["node_loss_survival"] = round(node_failure_survival(self.layout, sc.nodes), 4)

    def _imbalance(self, layout, alive: np.ndarray) -> float:
        """Mean over layers of max / mean expert load over live ranks (core's rank_load)."""
        rl = layout.rank_load(self.load).numpy()[:, alive]  # [L, live]
        mean = np.maximum(rl.mean(axis=1), 1e-12)
        return float(np.mean(rl.max(axis=1) / mean))

    def _scaled(self, layout) -> float:
        rel = self._imbalance(layout, self.inst.alive) / self.ref_imbalance
        return self.sc.timing.load_imbalance * max(rel, 1.0 / self.sc.timing.load_imbalance)

    def rejoin_source(self) -> str:
        return self.spec.rejoin_weights_source

    def reintegration_pause_s(self) -> float:
        return self.spec.reintegration_flip_s

    def recover(self, ev: FailureEvent, rec: FailureRecord, stranded: Stranded):
        yield self.env.timeout(self.sim.detection_s(ev.kind) + self.spec.reroute_s)
        if not self.inst.alive.any():
            # Nothing left to replan onto: wait for a rank to come back.
            self._start_restore(rec, stranded)
            self._held.append(rec.key)
            self.start_rejoin(ev.rank, ev.hardware_back_s)
            return
        dead = np.flatnonzero(~self.inst.alive).tolist()
        res = replan(self.layout, dead, self.load, rebalance_moves=self.spec.rebalance_moves)
        lost = int(round(len(res.uncovered) * self.layer_scale))
        t = repair.experts_repair_s(self.sc, self.repair_source, lost, self.inst.n_live)
        coverage_copies = len(res.uncovered) - len(res.unrepairable)
        extra = int(round((res.moved_experts - coverage_copies) * self.layer_scale))
        if extra > 0:  # rebalancing copies come from a surviving replica, after the repair
            t += repair.experts_repair_s(self.sc, "peer", extra, self.inst.n_live)
        self.weight_copies += res.moved_experts * self.layer_scale
        self.inst.extras["expert_weight_copies"] = int(round(self.weight_copies))
        degrade = self.spec.on_uncovered == "degrade"
        if res.unrepairable:
            self.inst.extras["unservable_failures"] = \
                self.inst.extras.get("unservable_failures", 0) + 1
        if degrade:
            # Serve now on what survived; copies land in the background.
            self.layout = res.layout
            self.inst.imbalance_override = self._scaled(self.layout)
            self._start_restore(rec, stranded)
            self.inst.unblock(rec.key)
            if res.uncovered:
                self._inexact_from(self.env.now)
            if t > 0:
                yield self.env.timeout(t)
            self.layout = res.repaired_layout
            self.inst.imbalance_override = self._scaled(self.layout)
            if res.unrepairable:
                self._unrepairable = True
            elif res.uncovered:
                self._inexact_until(self.env.now)
        else:
            if t > 0:
                yield self.env.timeout(t)
            self.layout = res.repaired_layout
            self.inst.imbalance_override = self._scaled(self.layout)
            self._start_restore(rec, stranded)
            if res.unrepairable:
                self._held.append(rec.key)
            else:
                self.inst.unblock(rec.key)
        self.start_rejoin(ev.rank, ev.hardware_back_s)

    def finish(self) -> None:
        self._unrepairable = False
        self._inexact_until(self.env.now)

    def _start_restore(self, rec: FailureRecord, stranded: Stranded) -> None:
        self.env.process(self.restore_kv(rec, stranded,
                                         interval_tokens=self.spec.kv_checkpoint_interval_tokens,
                                         source=self.spec.kv_restore_source))

    def _inexact_from(self, t: float) -> None:
        if self._inexact_since is None:
            self._inexact_since = t

    def _inexact_until(self, t: float) -> None:
        if self._inexact_since is not None and not self._unrepairable:
            self._inexact_s += t - self._inexact_since
            self._inexact_since = None
            self.inst.extras["inexact_s"] = round(self._inexact_s, 3)

    def on_rank_back(self, rank: int) -> None:
        dead = np.flatnonzero(~self.inst.alive).tolist()
        if dead:
            res = replan(self.base_layout, dead, self.load,
                         rebalance_moves=self.spec.rebalance_moves)
            self.layout = res.repaired_layout
            servable = not res.unrepairable
        else:
            self.layout = self.base_layout
            servable = True
        self.inst.imbalance_override = self._scaled(self.layout)
        if servable:
            self._unrepairable = False
            self._inexact_until(self.env.now)
            held, self._held = self._held, []
            for key in held:
                self.inst.unblock(key)
