"""Tarragon-style recovery: shadow experts and per-request KV restore.

Each rank's experts are shadowed in the residual GPU memory of the next
``shadow_spread_ranks`` ranks of its node. Timeline of one failure: the instance blocks;
after detection the routing table points the dead rank's experts at their shadows
(``reroute_s`` + activation) and the survivors resume at once, the shadow holders carrying the
dead rank's expert load. If every shadow holder is down too (a node failure), the lost experts
are copied from host memory first. Requests of the dead attention worker are restored from
their KV checkpoints onto live ranks, each recomputing the unsaved tail (half a checkpoint
interval on average). The rank is relaunched in the background and taken back with a short
pause (``reintegration_pause_s``).
"""

from __future__ import annotations

import numpy as np

from resilient_ep.sim import repair
from resilient_ep.sim.engine import FailureRecord, Stranded
from resilient_ep.sim.failures import FailureEvent
from resilient_ep.sim.policies.base import Policy
from resilient_ep.sim.static_layout import round_robin

__all__ = ["ShadowKV"]


class ShadowKV(Policy):
    name = "shadow_kv"

    def setup(self) -> None:
        self.spec = self.sc.policies.shadow_kv
        m = self.sc.model
        self.slots = round_robin(m.num_experts, self.sc.ranks, self.sc.slots_per_rank)
        self.out: set[int] = set()

    def rejoin_source(self) -> str:
        return self.spec.rejoin_weights_source

    def reintegration_pause_s(self) -> float:
        return self.spec.reintegration_pause_s

    def holders(self, rank: int) -> np.ndarray:
        """Ranks holding ``rank``'s shadows: the next ones in its node (wrapping)."""
        g = self.sc.ranks_per_node
        if g > 1:
            base = (rank // g) * g
            k = min(self.spec.shadow_spread_ranks, g - 1)
            return base + (rank - base + np.arange(1, k + 1)) % g
        k = min(self.spec.shadow_spread_ranks, self.sc.ranks - 1)
        return (rank + np.arange(1, k + 1)) % self.sc.ranks

    def _apply_loads(self) -> None:
        self.inst.rank_load[:] = 1.0
        for r in sorted(self.out):
            self.spread_load(r, self.holders(r))

    def recover(self, ev: FailureEvent, rec: FailureRecord, stranded: Stranded):
        yield self.env.timeout(self.sim.detection_s(ev.kind) + self.spec.reroute_s)
        self.out.add(ev.rank)
        live_holders = self.holders(ev.rank)
        live_holders = live_holders[self.inst.alive[live_holders]]
        if live_holders.size:
            t = self.sc.hardware.shadow_activate_s
        else:
            covered = np.zeros(self.sc.model.num_experts, dtype=bool)
            covered[self.slots[self.inst.alive].ravel()] = True
            experts = int((~covered).sum()) * self.sc.model.moe_layers
            t = repair.experts_repair_s(self.sc, "host", experts, self.inst.n_live)
        yield self.env.timeout(t)
        self._apply_loads()
        self.inst.unblock(rec.key)
        self.env.process(self.restore_kv(rec, stranded,
                                         interval_tokens=self.spec.kv_checkpoint_interval_tokens,
                                         source=self.spec.kv_restore_source))
        self.start_rejoin(ev.rank, ev.hardware_back_s)

    def on_rank_back(self, rank: int) -> None:
        self.out.discard(rank)
        self._apply_loads()
