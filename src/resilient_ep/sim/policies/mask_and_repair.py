"""EEP-style elastic membership: shrink, repair coverage, pause to reintegrate.

Timeline of one failure: the instance blocks; after detection the dead rank is fenced and
membership shrinks (``shrink_s``), experts that lost every replica in the static round-robin
layout are copied onto survivors from ``repair_source``; then the survivors serve, the dead
rank's slots handed out one by one to the ranks after it (some take two when there are more
slots than survivors); when the rank is back the load is even again. Requests that ran on the
dead rank's attention worker have no KV checkpoint and are lost. In the background the rank is relaunched (once its
GPU is usable), loads its weights from ``rejoin_weights_source`` and captures its graphs; the
healthy ranks then pause ``reintegration_pause_s`` to admit it.
"""

from __future__ import annotations

import numpy as np

from resilient_ep.sim import repair
from resilient_ep.sim.engine import FailureRecord, Stranded
from resilient_ep.sim.failures import FailureEvent
from resilient_ep.sim.policies.base import Policy
from resilient_ep.sim.static_layout import round_robin

__all__ = ["MaskAndRepair"]


class MaskAndRepair(Policy):
    name = "mask_and_repair"

    def setup(self) -> None:
        self.spec = self.sc.policies.mask_and_repair
        m = self.sc.model
        self.slots = round_robin(m.num_experts, self.sc.ranks, self.sc.slots_per_rank)
        self.repaired = np.zeros(m.num_experts, dtype=bool)
        """Experts copied onto survivors after they lost every replica."""

    def rejoin_source(self) -> str:
        return self.spec.rejoin_weights_source

    def reintegration_pause_s(self) -> float:
        return self.spec.reintegration_pause_s

    def uncovered(self) -> np.ndarray:
        m = self.sc.model
        covered = np.zeros(m.num_experts, dtype=bool)
        covered[self.slots[self.inst.alive].ravel()] = True
        return ~(covered | self.repaired)

    def recover(self, ev: FailureEvent, rec: FailureRecord, stranded: Stranded):
        yield self.env.timeout(self.sim.detection_s(ev.kind))
        self.inst.lose(stranded)
        self._hand_out_slots(ev.rank)
        lost = self.uncovered()
        experts = int(lost.sum()) * self.sc.model.moe_layers
        t = self.spec.shrink_s + repair.experts_repair_s(self.sc, self.spec.repair_source,
                                                         experts, self.inst.n_live)
        yield self.env.timeout(t)
        self.repaired |= lost
        self.inst.unblock(rec.key)
        self.start_rejoin(ev.rank, ev.hardware_back_s)

    def _hand_out_slots(self, rank: int) -> None:
        """The dead rank's slots go one by one to the live ranks that follow it (what
        coverage repair does): with S slots over n survivors some take one more than others."""
        load = self.inst.rank_load
        S = self.sc.slots_per_rank
        live = np.flatnonzero(self.inst.alive)
        if live.size:
            order = np.concatenate([live[live > rank], live[live < rank]])
            for j in range(S):
                load[order[j % order.size]] += load[rank] / S
        load[rank] = 0.0

    def on_rank_back(self, rank: int) -> None:
        self.rebalance()
        if self.inst.alive.all():
            self.repaired[:] = False
