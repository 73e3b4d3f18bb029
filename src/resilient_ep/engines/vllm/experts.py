"""Experts on vLLM: the core's placement in vLLM's expert maps, and repair while serving.

vLLM gives each EP rank a block of experts and an ``expert_map`` (global expert -> local slot,
-1 elsewhere) that every MoE kernel reads. With failover on, this module replaces both by the
core's:

- **Placement by budget** (:class:`ExpertPlan`): ``ceil(E / N) + placement.
  redundant_slots_per_rank`` regular slots per rank, filled by the core's survival-aware
  :func:`~resilient_ep.placement.place` (any expert count; the full mirror is the budget
  ``ceil(E / N)``, vLLM's default here), plus ``shadow`` slots chosen by
  :func:`~resilient_ep.shadow.plan_shadows`. The weight loader fills every held slot (vLLM
  reads the *held* map); the forward pass reads a separate *active* map per layer
  (``RoutedExperts._expert_map``): each expert served by exactly one live rank
  (:mod:`resilient_ep.active_experts`), rewritten in place (``copy_``: same storage, so CUDA
  graphs that captured it stay valid) whenever the membership or a repair changes it.
- **Repair while serving**: on a death, every worker runs the same core recovery policy
  (:class:`~resilient_ep.recovery.RecoveryOrchestrator`: replan, one weight copy per expert
  left without a live copy) on the same membership, so all agree on the plan without a
  message. A target rank copies its moves in a background thread from the cheapest source
  (:func:`resilient_ep.repair.candidates`: the node's host backup, the model files), falling
  back down the list when one fails. Until a copy lands, ``recovery.on_uncovered`` decides
  what a token routed to that expert gets: ``wait`` (the target's MoE pass waits for the copy,
  then computes it: exact) or ``degrade`` (the expert is dropped from that token's top-k).

Every worker process holds one :class:`ExpertState` (``current()``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from resilient_ep.active_experts import active_slots, local_expert_map
from resilient_ep.config import ResilienceConfig
from resilient_ep.expert_plan import ExpertPlan, regular_slots  # noqa: F401 (re-exported)
from resilient_ep.membership import Membership
from resilient_ep.recovery import PreparedJoin, RecoveryOrchestrator
from resilient_ep.repair import HostBackup, RepairProgress, candidates

from .expert_weights import copy_slot, disk_expert, slot_params
from .faults import injected_delay_s

__all__ = ["ExpertPlan", "ExpertState", "state_for", "current", "reset", "set_dead_ranks", "prepare_joined",
           "before_moe", "after_load", "skip_disk_experts"]

log = logging.getLogger("vllm." + __name__)

WAIT_POLL_S = 0.05


@dataclass
class _Layer:
    module: Any
    """vLLM's ``RoutedExperts`` (its expert parameters have the local slot as first dim)."""
    active: torch.Tensor
    """Its active expert map (written in place)."""
    name: str


class ExpertState:
    """One worker's view: the plan, the membership, its registered layers and its repairs."""

    def __init__(self, plan: ExpertPlan, ep_rank: int, config: ResilienceConfig | None = None, *,
                 backup: HostBackup | None = None, model_dir: str | None = None):
        self.plan, self.rank = plan, int(ep_rank)
        self.config = config or ResilienceConfig()
        self.membership = Membership(plan.N)
        self.recovery = RecoveryOrchestrator(self.membership, plan.layout, self.config)
        self.shadow_mask = plan.shadows.shadow_mask()
        self.layers: list[_Layer] = []
        self.backup = backup
        self.model_dir = model_dir
        self.progress = RepairProgress()
        self.counters: Counter[str] = Counter()
        self.disk_ok: bool | None = None
        """The disk source's self-check at load (None: not run)."""
        self.disk_reason = ""
        self.loaded_from: Counter[str] = Counter()
        """Where this rank's held experts came from at load, per source (a replacement's
        ``peer`` / ``host``; ``disk``: vLLM's loader)."""
        self._reload: dict[int, tuple[str, HostBackup]] | None = None
        self.uncovered: list[int] = []
        self.moves: list[dict] = []
        """Every planned copy of the instance: epoch, slot, expert, target rank."""
        self._dead: set[int] = set()
        self._pending: dict[int, int] = {}  # global slot -> expert, copies this rank owes
        self._lock = threading.Condition()
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._applying = 0
        self._applies = 0
        self._prepared: PreparedJoin | None = None
        """A join computed when it was heard (:meth:`prepare_joined`), for the switch."""
        self.last_join_prepared = False
        """Whether the last join's plan was the one computed ahead."""
        self.wait_mode = self.config.recovery.on_uncovered == "wait"
        self.wait_timeout_s = self.config.transport.step_timeout_ms / 1000.0

    # ------------------------------------------------------------------ maps
    def register(self, module: Any, active: torch.Tensor, name: str = "") -> None:
        with self._lock:
            self.layers.append(_Layer(module, active, name or f"layer{len(self.layers)}"))
            self._write_maps()

    def local_map(self) -> torch.Tensor:
        """This rank's active map now (pending copies excluded)."""
        active = active_slots(self.recovery.physical, self.membership.live_mask, self.shadow_mask)
        m = local_expert_map(active, self.rank, self.plan.slots_per_rank)[0]
        for slot, e in self._pending.items():
            if int(active[0, e]) == slot:
                m[e] = -1
        self.uncovered = [int(e) for e in (active[0] < 0).nonzero().flatten().tolist()]
        return m

    def _write_maps(self) -> None:
        m = self.local_map()
        for layer in self.layers:
            layer.active.copy_(m.to(layer.active.device, layer.active.dtype))

    # ------------------------------------------------------------------ failures
    def set_dead(self, dead_ep_ranks, *, copy: bool = True) -> None:
        """The EP ranks now dead (cumulative): plan the recovery (every worker the same),
        rewrite the maps in place, start this rank's copies (``copy=False``: record them
        only, as a replacement replaying the log does)."""
        with self._lock:
            new = sorted(set(int(r) for r in dead_ep_ranks) - self._dead)
            if not new:
                return
            self._dead |= set(new)
            plan = self.recovery.on_failure(new, "crash", {})
            moves = list(plan.replan.moves) if plan is not None and plan.view.live_ranks else []
            if moves:
                # Recorded at once, the same in every worker: what the slots will hold.
                self.recovery.repaired(moves)
            S = self.plan.slots_per_rank
            epoch = self.membership.epoch
            for m in moves:
                self.moves.append({"epoch": epoch, "slot": m.slot, "expert": m.expert,
                                   "rank": m.slot // S, "evicted": m.evicted})
            # A copy this rank owed into a slot of a rank now dead is moot; a pending one on
            # this rank stays pending.
            mine = [m for m in moves if m.slot // S == self.rank]
            for m in mine:
                self._pending[m.slot] = m.expert
                self.progress.planned(m.slot, m.expert)
            self._write_maps()
            generation = self._applies
        if plan is not None and plan.replan.unrepairable:
            log.warning("resilient-ep: experts %s lost every copy and no live slot can take "
                        "them: %s", [e for _, e in plan.replan.unrepairable],
                        self.config.recovery.on_uncovered)
        if not copy:
            return
        for m in mine:
            self._jobs.put((m.slot, m.expert, generation))
        if mine:
            self._ensure_thread()

    def prepare_joined(self, joined_ep_ranks) -> None:
        """When a join is heard (the membership subscriber's thread, some steps before the
        switch): the core's plan of it, computed now, so that :meth:`set_joined` at the
        switch (between two steps) only writes the maps. A loss in between makes it stale:
        the switch then computes afresh."""
        with self._lock:
            ranks = sorted(set(int(r) for r in joined_ep_ranks) & self._dead)
            if ranks:
                self._prepared = self.recovery.prepare_join(ranks, reloaded=True)

    def set_joined(self, joined_ep_ranks) -> None:
        """EP ranks taken back by a rejoin (fresh processes that loaded their initial slots):
        the core's ``on_join`` over the new live set, maps rewritten in place."""
        with self._lock:
            ranks = sorted(set(int(r) for r in joined_ep_ranks) & self._dead)
            if not ranks:
                return
            self._dead -= set(ranks)
            prepared, self._prepared = self._prepared, None
            plan = self.recovery.on_join(ranks, reloaded=True, prepared=prepared)
            self.last_join_prepared = plan.layout is getattr(prepared, "layout", None)
            self.counters["joins_prepared" if self.last_join_prepared
                          else "joins_computed_at_switch"] += 1
            S = self.plan.slots_per_rank
            for slot in [sl for sl in self._pending if sl // S in ranks]:
                del self._pending[slot]  # a copy into a slot the joined rank reloaded
            self.moves.append({"epoch": self.membership.epoch, "joined": ranks,
                               "uncovered": [list(x) for x in plan.uncovered]})
            self._write_maps()

    def replay(self, history: list[dict], ep_ranks_of: Callable[[int], set[int]]) -> None:
        """A replacement rank catches up with the instance: every loss and join of the
        authority's log (``history``: DP ranks, in order), applied as the survivors applied
        them, so its plan, moves and maps are theirs. It copies nothing: a copy into its own
        slots that the log implies was the lost process's to make, and its own join (the end
        of the log) gives it its initial slots, as it loaded them."""
        dead: set[int] = set()
        for event in history:
            ep = ep_ranks_of(int(event["rank"]))
            if event["kind"] == "loss":
                dead |= ep
                self.set_dead(dead, copy=False)
            else:
                dead -= ep
                self.set_joined(ep)

    def verify(self) -> dict[str, Any]:
        """This rank's slots against the node's host backup (bitwise, every layer), else
        against the model files: what a replacement checks before it joins."""
        held = self.recovery.physical.experts_on_rank(0, self.rank)
        S = self.plan.slots_per_rank
        slots = self.recovery.physical.physical_to_logical[0, self.rank * S:(self.rank + 1) * S]
        checked, bad, sources = 0, [], Counter()
        for layer in self.layers:
            params = dict(slot_params(layer.module))
            for local, e in enumerate(slots.tolist()):
                if e < 0:
                    continue
                want, source = None, None
                if self.backup is not None and self.backup.has(layer.name, e):
                    want, source = self.backup.get(layer.name, e), "host"
                elif self.model_dir and self.disk_ok:
                    want, source = disk_expert(layer.module, self.model_dir, e), "disk"
                if want is None:
                    continue
                checked += 1
                sources[source] += 1
                if not all(torch.equal(want[n].to(p.device), p.data[local])
                           for n, p in params.items()):
                    bad.append([layer.name, e])
        if self.loaded_from.keys() - {"disk"} and self.disk_ok is False and not sources["host"]:
            # Loaded from peers, checked against nothing: the disk self-check at load compared
            # a peer's copy with the model files and they differed.
            bad.append(["disk-check", self.disk_reason])
        return {"rank": self.rank, "held": held, "checked": checked, "mismatched": bad,
                "sources": dict(sources), "loaded": dict(self.loaded_from)}

    def settled_slots(self) -> dict[int, int]:
        """Expert -> local slot, for each expert this rank holds in a slot whose copy has
        landed (a copy still pending is left out)."""
        S = self.plan.slots_per_rank
        with self._lock:
            row = self.recovery.physical.physical_to_logical[
                0, self.rank * S:(self.rank + 1) * S].tolist()
            pending = set(self._pending)
        return {e: i for i, e in enumerate(row) if e >= 0 and self.rank * S + i not in pending}

    # ------------------------------------------------------------------ reintegration
    def export(self, ep_ranks, root: str) -> dict[str, Any]:
        """A survivor's part of a rejoin: write every expert that the replacement(s) of
        ``ep_ranks`` will hold and that this rank holds now (a settled slot: not a copy still
        pending) into the :class:`HostBackup` at ``root``, every layer, as it sits in the
        slot. The first writer of an expert wins; runs between two steps."""
        out = HostBackup(root)
        mine = self.settled_slots()
        wanted: set[int] = set()
        for r in ep_ranks:
            wanted |= set(self.plan.layout.experts_on_rank(0, int(r)))
        wrote, nbytes, t0 = [], 0, time.monotonic()
        delay = injected_delay_s("RESILIENT_EP_EXPORT_DELAY_MS")
        if delay and wanted & set(mine):  # fault injection: a slow export, to die in the middle
            mark = os.environ.get("RESILIENT_EP_EXPORT_MARK_DIR")
            if mark:  # of: it says when it starts
                open(os.path.join(mark, f"export-ep{self.rank}"), "w").close()
        for e in sorted(wanted & set(mine)):
            if delay:
                time.sleep(delay)
            for layer in self.layers:
                tensors = {n: p.data[mine[e]] for n, p in slot_params(layer.module)}
                if out.put(layer.name, e, tensors):
                    nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            wrote.append(e)
        return {"rank": self.rank, "experts": wrote, "bytes": nbytes,
                "seconds": time.monotonic() - t0}

    def plan_reload(self, peer_root: str | None) -> bool:
        """A replacement, before vLLM's loader reads the model files: where each expert it
        holds can come from instead (``repair.sources`` order among ``peer``: what the
        survivors exported for this join, and ``host``: the node's backup). True, and the
        plan kept for :meth:`after_load`, when every one has a source: the loader then skips
        the expert tensors of the model files. False leaves the loader as it is."""
        sources = {"peer": HostBackup(peer_root) if peer_root else None, "host": self.backup}
        order = [s for s in self.config.repair.sources if s in sources and sources[s]]
        held = self.plan.held_map(self.rank)
        plan: dict[int, tuple[str, HostBackup]] = {}
        for e in (held >= 0).nonzero().flatten().tolist():
            for kind in order:
                src = sources[kind]
                if all(src.has(layer.name, e) for layer in self.layers):
                    plan[int(e)] = (kind, src)
                    break
            else:
                log.info("resilient-ep: expert %d is in no peer export or host backup: the "
                         "replacement loads its experts from the model files", e)
                return False
        self._reload = plan
        return bool(plan)

    def _fill_from_reload(self) -> None:
        """The replacement's held slots from the planned sources (runtime format, as the
        survivors hold them); an expert whose files went missing since comes from disk."""
        held = self.plan.held_map(self.rank)
        t0 = time.monotonic()
        for e, (kind, src) in sorted(self._reload.items()):
            got = [src.get(layer.name, e) for layer in self.layers]
            if any(g is None for g in got):
                kind = "disk"
                got = [disk_expert(layer.module, self.model_dir, e) for layer in self.layers]
            for layer, tensors in zip(self.layers, got):
                copy_slot(layer.module, tensors, int(held[e]))
            self.loaded_from[kind] += 1
        log.info("resilient-ep: replacement's experts loaded in %.3f s from %s",
                 time.monotonic() - t0, dict(self.loaded_from))
        self._reload = None

    # ------------------------------------------------------------------ the MoE pass
    def before_moe(self, expert_map: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Called by the MoE kernel of every layer before it reads ``expert_map``. With copies
        pending on this rank and ``wait``: a token routed to one of them waits for it."""
        with self._lock:
            self._applying += 1
            self._applies += 1
            pending = list(self._pending.values())
        if not pending or not self.wait_mode:
            return
        wanted = torch.isin(topk_ids.flatten(), torch.tensor(pending, dtype=topk_ids.dtype))
        if not bool(wanted.any()):
            return
        need = set(int(e) for e in topk_ids.flatten()[wanted].tolist())
        t0 = time.monotonic()
        deadline = t0 + self.wait_timeout_s
        with self._lock:
            self._applying -= 1  # a waiting pass reads no weights: copies may proceed
            self._lock.notify_all()
            while need & set(self._pending.values()) and time.monotonic() < deadline:
                self._lock.wait(WAIT_POLL_S)
            late = need & set(self._pending.values())
            self._applying += 1
        self.counters["waits"] += 1
        self.counters["wait_ms"] += int((time.monotonic() - t0) * 1000)
        if late:
            self.counters["wait_timeouts"] += 1
            log.warning("resilient-ep: experts %s not repaired within %.1f s: this pass drops "
                        "them from the top-k", sorted(late), self.wait_timeout_s)

    def after_moe(self) -> None:
        with self._lock:
            self._applying -= 1
            self._lock.notify_all()

    def _quiesce(self, generation: int, timeout_s: float = 5.0) -> None:
        """Wait until no MoE pass that read the maps before this plan is still running (a
        copy must not overwrite a slot such a pass may read)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while (self._applying and self._applies <= generation
                   and time.monotonic() < deadline):
                self._lock.wait(0.01)

    # ------------------------------------------------------------------ copies
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._repair_loop, name="resilient-ep-repair",
                                            daemon=True)
            self._thread.start()

    def _repair_loop(self) -> None:
        while True:
            slot, expert, generation = self._jobs.get()
            try:
                self._quiesce(generation)
                self._copy(slot, expert)
            except Exception:  # never kill the thread: the copy stays pending, counted
                log.exception("resilient-ep: repair of expert %d into slot %d failed", expert, slot)
                self.counters["repair_errors"] += 1

    def _copy(self, slot: int, expert: int) -> None:
        cfg = self.config.repair
        live = self.membership.view().live_ranks
        with self._lock:
            if self._pending.get(slot) != expert:
                return
            physical = self.recovery.physical
        cands = candidates(physical, 0, expert, self.rank, live_ranks=live, sources=cfg.sources,
                           host_has=self._host_has, disk=self.disk_ok is not False,
                           exclude_slots=[slot])
        local = slot - self.rank * self.plan.slots_per_rank
        delay = injected_delay_s("RESILIENT_EP_REPAIR_DELAY_MS")
        if delay:
            time.sleep(delay)  # fault injection: a slow source (the MoE passes must wait)
        for c in cands:
            t0 = time.monotonic()
            try:
                nbytes = self._read_into(c, local, expert)
            except Exception as e:
                self.progress.failed(c.kind)
                log.warning("resilient-ep: repair source %s failed for expert %d: %s; trying "
                            "the next", c.kind, expert, e)
                continue
            if nbytes is None:
                self.progress.failed(c.kind)
                continue
            self.progress.copied(slot, expert, c.kind, nbytes, time.monotonic() - t0)
            with self._lock:
                if self._pending.get(slot) == expert:
                    del self._pending[slot]
                self._write_maps()
                self._lock.notify_all()
            log.info("resilient-ep: expert %d repaired into local slot %d from %s (%d bytes)",
                     expert, local, c.kind, nbytes)
            return
        self.counters["repair_exhausted"] += 1
        log.error("resilient-ep: no repair source could bring expert %d back (tried %s)",
                  expert, [c.kind for c in cands])

    def _host_has(self, layer: int, expert: int) -> bool:
        return self.backup is not None and all(self.backup.has(l.name, expert) for l in self.layers)

    def _read_into(self, cand, local_slot: int, expert: int) -> int | None:
        """Copy ``expert`` into ``local_slot`` of every layer from ``cand``; bytes copied."""
        if cand.kind == "shadow":
            src = cand.slot - self.rank * self.plan.slots_per_rank
            return sum(copy_slot(l.module, {n: p.data[src] for n, p in slot_params(l.module)},
                                  local_slot) for l in self.layers)
        if cand.kind == "host":
            got = [self.backup.get(l.name, expert) if self.backup else None for l in self.layers]
            if any(g is None for g in got):
                return None
            return sum(copy_slot(l.module, g, local_slot) for l, g in zip(self.layers, got))
        if cand.kind == "disk":
            return sum(copy_slot(l.module, disk_expert(l.module, self.model_dir, expert),
                                  local_slot) for l in self.layers)
        return None  # "peer": no live peer holds an expert that lost every copy (module doc)

    # ------------------------------------------------------------------ after load
    def after_load(self) -> None:
        """Weights are in runtime format: fill the host backup with what this rank holds and
        check the disk source against a loaded slot (bitwise)."""
        held = self.plan.held_map(self.rank)
        experts = [int(e) for e in (held >= 0).nonzero().flatten().tolist()]
        if self._reload is not None:
            self._fill_from_reload()
        else:
            self.loaded_from["disk"] += len(experts)
        if self.backup is not None:
            t0 = time.monotonic()
            wrote = 0
            for l in self.layers:
                for e in experts:
                    s = int(held[e])
                    wrote += self.backup.put(l.name, e, {n: p.data[s]
                                                         for n, p in slot_params(l.module)})
            self.counters["backup_written"] += wrote
            log.info("resilient-ep: host backup: %d expert copies written in %.2f s (%s)",
                     wrote, time.monotonic() - t0, self.backup.root)
        if self.model_dir and self.layers and experts and "disk" in self.config.repair.sources:
            e = experts[0]
            try:
                want = dict(slot_params(self.layers[0].module))
                got = disk_expert(self.layers[0].module, self.model_dir, e)
                s = int(held[e])
                self.disk_ok = all(torch.equal(got[n].to(p.device), p.data[s])
                                   for n, p in want.items())
                self.disk_reason = "" if self.disk_ok else "disk weights differ from the loaded"
            except Exception as ex:
                self.disk_ok, self.disk_reason = False, f"{type(ex).__name__}: {ex}"
            if not self.disk_ok:
                log.warning("resilient-ep: the disk repair source is off on this rank (%s)",
                            self.disk_reason)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"rank": self.rank, "epoch": self.membership.epoch,
                    "plan": self.plan.describe(), "uncovered": list(self.uncovered),
                    "pending": sorted(self._pending.values()),
                    "shadows": self.plan.shadows.shadows_on_rank(0, self.rank),
                    "active_shadows": self._active_shadows(),
                    "held": self.recovery.physical.experts_on_rank(0, self.rank),
                    "moves": list(self.moves), "repair": self.progress.to_dict(),
                    "counters": dict(self.counters),
                    "disk_source": {"ok": self.disk_ok, "reason": self.disk_reason},
                    "host_backup": None if self.backup is None else str(self.backup.root)}

    def _active_shadows(self) -> int:
        """Shadow slots of this rank that serve an expert now."""
        active = active_slots(self.recovery.physical, self.membership.live_mask, self.shadow_mask)
        S = self.plan.slots_per_rank
        slots = active[0][(active[0] >= self.rank * S) & (active[0] < (self.rank + 1) * S)]
        return int(self.shadow_mask[slots].sum())


# ---------------------------------------------------------------------- per process
_state: ExpertState | None = None
_state_lock = threading.Lock()


def state_for(num_experts: int, num_ranks: int, ep_rank: int, *, config: ResilienceConfig,
              shadow_slots: int = 0, instance: str | None = None,
              model_dir: str | None = None) -> ExpertState:
    """This process's :class:`ExpertState` (made on first use; one model per process)."""
    global _state
    with _state_lock:
        s = _state
        if s is not None and (s.plan.E, s.plan.N, s.rank) == (num_experts, num_ranks, ep_rank):
            return s
        backup = None
        if config.repair.host_backup and instance:
            from resilient_ep.repair.host_backup import default_root

            backup = HostBackup(default_root(instance))
        plan = ExpertPlan(num_experts, num_ranks, config, shadow_slots=shadow_slots)
        _state = ExpertState(plan, ep_rank, config, backup=backup, model_dir=model_dir)
        return _state


def current() -> ExpertState | None:
    return _state


def reset() -> None:
    """Forget the state (a new model in this process; tests)."""
    global _state
    with _state_lock:
        _state = None


def set_dead_ranks(dead_ep_ranks) -> None:
    s = _state
    if s is not None and s.layers:
        s.set_dead(dead_ep_ranks)


def prepare_joined(joined_ep_ranks) -> None:
    """:meth:`ExpertState.prepare_joined` on this process's state (none: nothing)."""
    s = _state
    if s is not None and s.layers:
        s.prepare_joined(joined_ep_ranks)


def before_moe(expert_map: torch.Tensor, topk_ids: torch.Tensor) -> Callable[[], None] | None:
    """The MoE kernel's hook (see :meth:`ExpertState.before_moe`); returns the matching
    ``after`` call, or None when this layer is not ours."""
    s = _state
    if s is None or not s.layers:
        return None
    s.before_moe(expert_map, topk_ids)
    return s.after_moe


def after_load(model: Any = None) -> None:
    s = _state
    if s is not None and s.layers:
        s.after_load()
        if model is not None:  # what a rejoin compares, ready before anyone asks
            from . import probe, weights_digest

            routed = routed_param_ids()
            weights_digest.start(model, routed)
            probe.start(model, routed)


def skip_disk_experts() -> bool:
    """vLLM's loader asks (a replacement only): may it skip the expert tensors of the model
    files? Yes when every expert this rank holds is in a peer export or the host backup
    (:meth:`ExpertState.plan_reload`); :func:`after_load` then fills the slots from there."""
    from .replacement import EXPERTS_ENV, is_replacement

    s = _state
    if s is None or not s.layers or not is_replacement():
        return False
    return s.plan_reload(os.environ.get(EXPERTS_ENV))


def routed_param_ids() -> frozenset[int]:
    """``id()`` of every routed-expert parameter of this process's registered layers."""
    s = _state
    if s is None:
        return frozenset()
    return frozenset(id(p) for layer in s.layers for _, p in slot_params(layer.module))


def bytes_per_expert(hf_config: Any, dtype_bytes: int) -> int:
    """One expert's weights over every MoE layer (gate, up and down projections)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    hidden = int(text.hidden_size)
    inter = int(getattr(text, "moe_intermediate_size", 0) or text.intermediate_size)
    layers = int(text.num_hidden_layers)
    return 3 * hidden * inter * dtype_bytes * max(1, layers)


def shadow_slots(config: ResilienceConfig, hf_config: Any, dtype_bytes: int, num_experts: int,
                 num_ranks: int, local_ranks: int = 1) -> int:
    """Shadow slots per rank from ``shadow.*`` (0 when off), decided once in the front end."""
    from resilient_ep.shadow import residual_bytes, shadow_slots_for_memory

    if not config.shadow.enabled:
        return 0
    _, regular = regular_slots(num_experts, num_ranks, config)  # no placement needed here
    return shadow_slots_for_memory(residual_bytes() / max(1, local_ranks),
                                   config.shadow.memory_fraction,
                                   bytes_per_expert(hf_config, dtype_bytes),
                                   max_slots=config.shadow.max_slots_per_rank,
                                   free_experts=num_experts - regular)

