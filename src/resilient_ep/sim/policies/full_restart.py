"""Fixed membership: a failure restarts every rank.

Timeline of one failure: the instance blocks at once (the step waits on the dead rank);
after detection every surviving process is torn down, the front end refuses arrivals (unless
``queue_during_restart``), the failed rank's GPU must be usable again (a ``recover`` event),
then every rank starts, builds communicators, loads its weights (the node's ranks share the
storage bandwidth), captures graphs and warms up. In-flight requests are kept by the router
and re-prefilled from scratch (their whole context counts as recomputed). A failure during
the restart starts it over.
"""

from __future__ import annotations

import numpy as np
import simpy

from resilient_ep.sim import repair
from resilient_ep.sim.engine import SERVING, FailureRecord, Stranded
from resilient_ep.sim.failures import FailureEvent
from resilient_ep.sim.policies.base import Policy

__all__ = ["FullRestart"]


class FullRestart(Policy):
    name = "full_restart"

    def setup(self) -> None:
        self.spec = self.sc.policies.full_restart
        self._proc = None
        self._pending: list = []
        self._stranded = Stranded()
        self._hw_back = np.zeros(self.sc.ranks)

    def recover(self, ev: FailureEvent, rec: FailureRecord, stranded: Stranded):
        self._stranded.add(stranded)
        self._pending.append(rec.key)
        self._launch(ev)
        return
        yield  # a SimPy process body with nothing to wait for

    def on_failure_while_out(self, ev: FailureEvent) -> None:
        # A relaunched process died during the restart: the restart begins again.
        self._launch(ev)

    def _launch(self, ev: FailureEvent) -> None:
        self._hw_back[ev.rank] = max(self._hw_back[ev.rank], ev.hardware_back_s)
        if self._proc is not None and self._proc.is_alive:
            self._proc.interrupt("another failure")
        self._proc = self.env.process(self._restart(self.sim.detection_s(ev.kind)))

    def _restart(self, detect_s: float):
        inst, sc, spec = self.inst, self.sc, self.spec
        try:
            yield self.env.timeout(detect_s)
            serving = np.flatnonzero(inst.state == SERVING)
            if serving.size:
                self._stranded.add(inst.take_ranks(serving))
            inst.frontend_up = spec.queue_during_restart
            yield self.env.timeout(spec.teardown_s)
            wait = float(self._hw_back.max()) - self.env.now
            if wait > 0:
                yield self.env.timeout(wait)
            r = sc.restart
            load = repair.rank_weights_s(sc, spec.weights_source,
                                         loaders_per_node=sc.ranks_per_node)
            yield self.env.timeout(r.process_start_s + r.dist_init_s + load + r.graph_capture_s
                                   + spec.warmup_s)
            inst.add_ranks(np.arange(sc.ranks))
            self.rebalance()
            inst.frontend_up = True
            s = self._stranded
            if s.count > 0:
                inst.resume(s, prefill_tokens_each=s.ctx_tokens / s.count)
            self._stranded = Stranded()
            pending, self._pending = self._pending, []
            for key in pending:
                inst.unblock(key)
        except simpy.Interrupt:
            return
