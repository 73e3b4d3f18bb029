"""What every policy shares: detection, relaunching a rank, KV restore, load bookkeeping.

A policy is a class with

- ``setup()``: before the run (initial layout, imbalance);
- ``recover(event, record, stranded)``: a SimPy process started at the failure of a serving
  rank. The instance is blocked under ``record.key`` from that moment (the step that needs the
  dead rank cannot finish); the policy lifts it with ``inst.unblock(record.key)`` and decides
  the fate of ``stranded``, the requests that ran on the rank;
- ``on_failure_while_out(event)``: the rank was already out of the instance (restarting,
  rejoining, or failed again): by default its relaunch starts over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from resilient_ep.sim import repair
from resilient_ep.sim.engine import FailureRecord, Stranded
from resilient_ep.sim.failures import FailureEvent

if TYPE_CHECKING:
    from resilient_ep.sim.engine import Simulation

__all__ = ["Policy"]


class Policy:
    """Base class; subclasses set ``name`` and implement ``recover``."""

    name = ""

    def __init__(self, sim: "Simulation"):
        self.sim = sim
        self.sc = sim.sc
        self.env = sim.env
        self.inst = sim.inst
        self._rejoins: dict[int, Any] = {}

    # ----------------------------------------------------------------- to override
    def setup(self) -> None:
        pass

    def recover(self, ev: FailureEvent, rec: FailureRecord, stranded: Stranded):
        raise NotImplementedError
        yield  # pragma: no cover

    def finish(self) -> None:
        """Called once at the end of the run (close open intervals)."""

    def on_failure_while_out(self, ev: FailureEvent) -> None:
        if ev.rank in self._rejoins:
            self.start_rejoin(ev.rank, ev.hardware_back_s,
                              delay_s=self.sim.detection_s(ev.kind))

    def rejoin_source(self) -> str:
        return "disk"

    def reintegration_pause_s(self) -> float:
        return 0.0

    def on_rank_back(self, rank: int) -> None:
        """Called when a relaunched rank is admitted (after the pause)."""

    # ------------------------------------------------------------------- helpers
    def spread_load(self, rank: int, targets: np.ndarray) -> None:
        """The expert load of ``rank`` moves to ``targets`` (live ranks), evenly."""
        load = self.inst.rank_load
        targets = targets[self.inst.alive[targets]]
        if targets.size == 0:
            targets = np.flatnonzero(self.inst.alive)
        if targets.size:
            load[targets] += load[rank] / targets.size
        load[rank] = 0.0

    def rebalance(self) -> None:
        """Every live rank carries the same share again (EPLB after a membership change)."""
        self.inst.rank_load[:] = np.where(self.inst.alive, 1.0, 0.0)

    def restore_kv(self, rec: FailureRecord, stranded: Stranded, *, interval_tokens: int,
                   source: str):
        """SimPy process: restore ``stranded`` requests from their KV checkpoints onto the
        live ranks. Each recomputes the unsaved tail, half a checkpoint interval on average."""
        if stranded.count <= 0:
            return
        tail = min(interval_tokens / 2.0, stranded.ctx_tokens / stranded.count)
        saved_tokens = stranded.ctx_tokens - tail * stranded.count
        n = max(1, self.inst.n_live)
        per_dest = saved_tokens * self.sc.model.kv_kb_per_token * 1e3 / n
        t = repair.transfer_s(self.sc, source, per_dest,
                              loaders_per_node=min(n, self.sc.ranks_per_node))
        rec.restore_until = self.env.now + t
        yield self.env.timeout(t)
        self.inst.resume(stranded, prefill_tokens_each=tail)

    def start_rejoin(self, rank: int, hardware_back_s: float, *, delay_s: float = 0.0) -> None:
        old = self._rejoins.get(rank)
        if old is not None and old.is_alive:
            old.interrupt("rank failed again")
        self._rejoins[rank] = self.env.process(self._rejoin(rank, hardware_back_s, delay_s))

    def _rejoin(self, rank: int, hardware_back_s: float, delay_s: float):
        key = None
        try:
            yield self.env.timeout(max(delay_s, hardware_back_s - self.env.now))
            r = self.sc.restart
            # Ranks of this node relaunching at the same time share its storage.
            node = self.sc.node_of(rank)
            loaders = sum(1 for q, p in self._rejoins.items()
                          if p.is_alive and self.sc.node_of(q) == node)
            load = repair.rank_weights_s(self.sc, self.rejoin_source(),
                                         loaders_per_node=max(1, loaders))
            yield self.env.timeout(r.process_start_s + load + r.graph_capture_s)
            pause = self.reintegration_pause_s()
            if pause > 0:
                key = ("reintegrate", rank, self.env.now)
                self.inst.block(key)
                yield self.env.timeout(pause)
                self.inst.reintegration_pause_s += pause
            self.inst.add_ranks([rank])
            self.on_rank_back(rank)
            if key is not None:
                self.inst.unblock(key)
                key = None
            self._rejoins.pop(rank, None)
        except simpy.Interrupt:
            if key is not None:
                self.inst.unblock(key)
