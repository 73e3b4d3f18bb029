"""Recovery orchestration, engine-agnostic: what to do when ranks fail.

``detect -> fence -> reroute -> restore -> (repair -> reintegrate)``. The orchestrator decides;
the host (the reference runtime's coordinator, an engine adapter) carries the decision out:

1. **fence**: a new membership epoch with the ranks ``dead`` (crash) or ``fenced`` (hang);
2. **reroute**: the layout replanned over the live ranks (``placement.replan``: no weight
   moves; experts that lost every replica are listed as ``uncovered``) — the host broadcasts it
   and every rank patches its routing table in place;
3. **restore**: each request owned by a lost rank gets a new owner, the least-loaded live rank
   (ties to the lowest rank id; on several hosts a rank of another node first), so the host
   re-admits it there (resuming from a KV checkpoint where one survives, else recomputing
   prompt + generated tokens);
4. **repair**: ``plan.replan.moves`` are the weight copies that restore coverage. The host
   first routes by :meth:`RecoveryOrchestrator.vacate` (the slots to overwrite taken out of
   the tables), has the owners load the weights, reports each finished copy with
   :meth:`RecoveryOrchestrator.repaired` and routes by the layout it returns.

The orchestrator keeps ``physical``: what every slot holds right now (the initial layout,
updated by finished repairs and by rejoins, which reload a rank's initial slots), so every
replan starts from the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

import torch

from .config import ResilienceConfig
from .layout import ExpertLayout
from .membership import Membership, MembershipView, RankState
from .placement import ReplanResult, replan

__all__ = ["RecoveryPlan", "JoinPlan", "PreparedJoin", "RecoveryOrchestrator", "Assignment", "assign_requests"]


@dataclass(frozen=True)
class RecoveryPlan:
    view: MembershipView
    """Membership after the failure (new epoch)."""
    failed: tuple[int, ...]
    """Ranks that failed in this event."""
    kind: str
    """``crash`` or ``hang``."""
    layout: ExpertLayout
    """Layout to route by now (lost ranks' slots empty)."""
    replan: ReplanResult
    """Full replan, with the weight moves that would restore coverage."""
    uncovered: list[tuple[int, int]]
    """(layer, expert) with no live replica."""
    migrations: dict[str, int] = field(default_factory=dict)
    """Request id -> new owner rank."""
    abandoned: list[str] = field(default_factory=list)
    """Requests that cannot be moved (no live rank, or migration disabled)."""
    exhausted: list[str] = field(default_factory=list)
    """Requests failed for having been in flight at ``recovery.max_request_failures`` rank
    deaths (likely poison: they kill the ranks they run on)."""


@dataclass(frozen=True)
class JoinPlan:
    view: MembershipView
    """Membership after the join (new epoch)."""
    joined: tuple[int, ...]
    layout: ExpertLayout
    """Layout to route by from the join on: the joined ranks hold their original slots."""
    uncovered: list[tuple[int, int]]
    """(layer, expert) still without a live replica."""


@dataclass(frozen=True)
class PreparedJoin:
    """A join computed ahead (:meth:`RecoveryOrchestrator.prepare_join`)."""

    ranks: tuple[int, ...]
    reloaded: bool
    epoch: int
    """The membership epoch it was computed at."""
    base: ExpertLayout
    """The slots it started from (``physical`` then)."""
    physical: ExpertLayout
    replan: ReplanResult
    layout: ExpertLayout


class Assignment(NamedTuple):
    migrations: dict[str, int]
    """Request id -> its new owner."""
    abandoned: list[str]
    """Requests nobody takes (no live rank, or migration off)."""
    exhausted: list[str]
    """Requests that have now been in flight at ``max_request_failures`` rank deaths: failed
    with an error, not moved again."""


def assign_requests(owners: Mapping[str, int], failed: Iterable[int], live: Iterable[int], *,
                    load: Mapping[int, int] | None = None, migrate: bool = True,
                    deaths: Mapping[str, int] | None = None, max_request_failures: int = 0,
                    nodes: Mapping[int, int] | None = None) -> Assignment:
    """Who takes which request when ``failed`` ranks are lost: the one policy of every host
    (the reference coordinator, the vLLM front end).

    ``owners``: request id -> its owner rank (every running request, so the survivors' own
    work counts as load); ``load``: requests per live rank when the caller knows better (it
    replaces the count from ``owners``). Each request of a failed rank goes, in the order of
    ``owners``, to the live rank with the least work so far (ties: the lowest rank id), and
    counts there for the next. ``deaths``: request id -> rank deaths it was in flight at
    before this one; a request reaching ``max_request_failures`` (> 0) with this death is
    ``exhausted`` instead of moved.

    Requests that were in flight at a death are *suspects* (one of them may be what kills
    ranks): each moved request goes to the live rank holding the fewest suspects first, then
    the least work, so that suspects are kept apart where there are ranks enough. A request
    that kills every rank it runs on then meets ``max_request_failures`` alone, instead of
    taking an innocent request that was moved beside it down too.

    ``nodes``: rank -> node (several hosts). A live rank on the node of a rank lost now comes
    after every rank of the other nodes: a node that fails whole is seen one rank at a time,
    and a request moved to the next victim would die twice (and count a death too many
    towards ``max_request_failures``); the lost rank's KV copies are on other nodes too. Only
    when no other node has a live rank do its node-mates take the requests. Returns an
    :class:`Assignment`.
    """
    failed = set(failed)
    work = {r: 0 for r in live}
    if load is not None:
        work.update({r: int(n) for r, n in load.items() if r in work})
    else:
        for owner in owners.values():
            if owner in work:
                work[owner] += 1
    migrations: dict[str, int] = {}
    abandoned: list[str] = []
    exhausted: list[str] = []
    deaths = deaths or {}
    suspects = {r: 0 for r in work}
    for rid, owner in owners.items():
        if owner in suspects and deaths.get(rid, 0) >= 1:
            suspects[owner] += 1
    failed_nodes = {nodes[r] for r in failed if r in nodes} if nodes else set()
    shares_fate = {r: bool(nodes) and nodes.get(r) in failed_nodes for r in work}
    for rid, owner in owners.items():
        if owner not in failed:
            continue
        if max_request_failures and deaths.get(rid, 0) + 1 >= max_request_failures:
            exhausted.append(rid)
            continue
        if not migrate or not work:
            abandoned.append(rid)
            continue
        target = min(work, key=lambda r: (shares_fate[r], suspects[r], work[r], r))
        migrations[rid] = target
        work[target] += 1
        suspects[target] += 1
    return Assignment(migrations, abandoned, exhausted)


class RecoveryOrchestrator:
    def __init__(self, membership: Membership, layout: ExpertLayout,
                 config: ResilienceConfig | None = None, *, shadow_mask=None,
                 rank_nodes: Mapping[int, int] | None = None):
        self.membership = membership
        self.rank_nodes = dict(rank_nodes) if rank_nodes else None
        """rank -> node (several hosts): requests leave a failing node (``assign_requests``)."""
        self.initial_layout = layout
        self.physical = layout
        """What every slot holds now (dead ranks: what they held)."""
        self.shadow_mask = shadow_mask
        """[P] bool, the shadow slots (``shadow.ShadowLayout``): routed only for an expert
        that has no live regular copy. None: no shadows."""
        self.layout = self._routing(layout)
        self._last = replan(layout, [])
        self.config = config or ResilienceConfig()
        self.uncovered: set[tuple[int, int]] = set()
        self._planned: set[int] = set()
        """Ranks whose loss has been planned for (until they join again)."""

    def on_failure(self, ranks: Iterable[int], kind: str, owners: Mapping[str, int],
                   load=None, deaths: Mapping[str, int] | None = None) -> RecoveryPlan | None:
        """Plan recovery from ``ranks`` failing (``kind`` crash|hang). ``owners``: the running
        requests' current owner ranks; ``deaths``: how many rank deaths each had been in flight
        at before (``recovery.max_request_failures``). The ranks may still be live in the
        membership (they are failed here: one epoch bump) or already out of it (the instance's
        liveness authority recorded the loss first). None when every one of them was planned
        for already."""
        if kind not in ("crash", "hang"):
            raise ValueError(f"kind must be 'crash' or 'hang', got {kind!r}")
        ranks = tuple(sorted(set(ranks) - self._planned))
        if not ranks:
            return None
        state = RankState.DEAD if kind == "crash" else RankState.FENCED
        view = self.membership.fail(ranks, state=state)
        self._planned |= set(ranks)
        out = [r for r, s in enumerate(view.states) if s is not RankState.LIVE]
        if not view.live_ranks:
            return RecoveryPlan(view, ranks, kind, self.layout, self._last, sorted(self.uncovered),
                                abandoned=[rid for rid, o in owners.items() if o in ranks])
        res = replan(self.physical, out, load)
        self.layout, self._last = self._routing(res.layout), res
        self.uncovered = set(res.uncovered)
        max_failures = self.config.recovery.max_failures
        too_many = bool(max_failures and len(out) > max_failures)
        rc = self.config.recovery
        a = assign_requests(owners, ranks, view.live_ranks,
                            migrate=rc.migrate_requests and not too_many, deaths=deaths,
                            max_request_failures=rc.max_request_failures,
                            nodes=self.rank_nodes)
        return RecoveryPlan(view, ranks, kind, self.layout, res, sorted(self.uncovered),
                            a.migrations, a.abandoned, a.exhausted)

    def prepare_join(self, ranks: Iterable[int], load=None, *,
                     reloaded: bool = True) -> PreparedJoin:
        """:meth:`on_join`'s computation, done ahead (when the join is heard, before the step
        that switches to it) and nothing changed: the slots and routing layout the join of
        ``ranks`` will give. :meth:`on_join` takes it when nothing happened in between (the
        same epoch, the same slots), else computes afresh."""
        ranks = tuple(sorted(set(ranks)))
        rows = self.physical.physical_to_logical.clone()
        for r in ranks if reloaded else ():  # a fresh process loaded its initial slots
            sl = list(self.initial_layout.slots_of_rank(r))
            rows[:, sl] = self.initial_layout.physical_to_logical[:, sl]
        physical = self._with_rows(rows)
        states = self.membership.view().states
        out = [r for r, s in enumerate(states) if s is not RankState.LIVE and r not in ranks]
        res = replan(physical, out, load)
        return PreparedJoin(ranks, reloaded, self.membership.epoch, self.physical, physical,
                            res, self._routing(res.layout))

    def on_join(self, ranks: Iterable[int], load=None, *, reloaded: bool = True,
                prepared: PreparedJoin | None = None) -> JoinPlan:
        """Admit repaired ranks (already loaded and warm, state ``joining``): one epoch bump,
        and the layout over the new live set. ``reloaded``: each joined rank is a fresh
        process that loaded the slots it held in the initial layout; False: a fenced rank
        taken back as it is (its weights, repaired copies included, are what it held).
        ``prepared``: :meth:`prepare_join`'s result for the same join (used only when still
        current: nothing but a table write is left for the switch)."""
        ranks = tuple(sorted(set(ranks)))
        p = prepared
        if (p is None or p.ranks != ranks or p.reloaded != reloaded or load is not None
                or p.epoch != self.membership.epoch or p.base is not self.physical):
            p = self.prepare_join(ranks, load, reloaded=reloaded)
        view = self.membership.join(ranks)
        self._planned -= set(ranks)
        self.physical = p.physical
        self.layout, self._last = p.layout, p.replan
        self.uncovered = set(p.replan.uncovered)
        return JoinPlan(view, ranks, self.layout, sorted(self.uncovered))

    # ------------------------------------------------------------------ weight repair
    def _with_rows(self, rows) -> ExpertLayout:
        """What the slots hold (``self.physical``): repairs and a rank taken back can leave
        more copies of an expert than the routing table is wide; they are all recorded."""
        return ExpertLayout.from_mapping(rows, num_ranks=self.initial_layout.num_ranks,
                                         num_experts=self.initial_layout.num_experts)

    def _routing(self, layout: ExpertLayout) -> ExpertLayout:
        """``layout`` as a routing layout: at most ``max_replicas`` copies of an expert routed
        (the first ones by slot; a copy past that holds its weights but gets no tokens), in
        the table width every rank was built with (fixed: CUDA graphs captured it)."""
        k = self.initial_layout.max_replicas
        rows = layout.physical_to_logical
        if self.shadow_mask is not None and bool(self.shadow_mask.any()):
            # A shadow takes tokens only for an expert that lost every regular copy (a table
            # flip: its weights are there already).
            rows = rows.clone()
            shadow = self.shadow_mask.to(torch.bool)
            for layer in range(rows.shape[0]):
                regular = set(rows[layer][~shadow].tolist()) - {-1}
                row = rows[layer]
                for slot in shadow.nonzero().flatten().tolist():
                    if int(row[slot]) in regular:
                        row[slot] = -1
        if ExpertLayout.from_mapping(rows, num_ranks=layout.num_ranks,
                                     num_experts=layout.num_experts).max_replicas > k:
            rows = rows.clone()
            for layer in range(rows.shape[0]):
                seen: dict[int, int] = {}
                for slot, e in enumerate(rows[layer].tolist()):
                    if e < 0:
                        continue
                    seen[e] = seen.get(e, 0) + 1
                    if seen[e] > k:
                        rows[layer, slot] = -1
        return ExpertLayout.from_mapping(rows, num_ranks=self.initial_layout.num_ranks,
                                         num_experts=self.initial_layout.num_experts,
                                         max_replicas=k)

    def _routing_layout(self) -> ExpertLayout:
        out = [r for r, s in enumerate(self.membership.view().states) if s is not RankState.LIVE]
        res = replan(self.physical, out)
        self._last = res
        self.uncovered = set(res.uncovered)
        return self._routing(res.layout)

    def vacate(self, moves) -> ExpertLayout:
        """The current routing layout with the slots about to be overwritten taken out, so no
        token is sent to a slot while its weights change. Sets and returns ``self.layout``."""
        rows = self._routing_layout().physical_to_logical.clone()
        for m in moves:
            rows[m.layer, m.slot] = -1
        self.layout = self._routing(self._with_rows(rows))
        return self.layout

    def repaired(self, moves) -> ExpertLayout:
        """Weight copies that finished (each slot now holds ``move.expert``): record them and
        return the layout to route by (also ``self.layout``; ``self.uncovered`` updated)."""
        rows = self.physical.physical_to_logical.clone()
        for m in moves:
            rows[m.layer, m.slot] = m.expert
        self.physical = self._with_rows(rows)
        self.layout = self._routing_layout()
        return self.layout
