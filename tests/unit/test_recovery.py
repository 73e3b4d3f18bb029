import pytest

from resilient_ep.config import ResilienceConfig
from resilient_ep.layout import ExpertLayout
from resilient_ep.membership import Membership, RankState
from resilient_ep.recovery import RecoveryOrchestrator


def _orch(cfg=None):
    # 4 ranks x 2 slots, 4 experts, mirror pairs (0, 2) and (1, 3).
    lay = ExpertLayout.from_mapping([[0, 1, 2, 3, 0, 1, 2, 3]], num_ranks=4, num_experts=4)
    return RecoveryOrchestrator(Membership(4), lay, cfg)


def test_crash_fences_reroutes_and_migrates_to_least_loaded():
    o = _orch()
    owners = {"a": 1, "b": 1, "c": 0, "d": 2, "e": 3}
    plan = o.on_failure([1], "crash", owners)
    assert plan.view.epoch == 1 and plan.view.states[1] is RankState.DEAD
    assert plan.layout.physical_to_logical.tolist() == [[0, 1, -1, -1, 0, 1, 2, 3]]
    assert plan.uncovered == [], "experts 2 and 3 keep their replica on rank 3"
    # Survivors 0, 2, 3 each own one request: a -> 0, b -> 2 (ties to the lowest rank).
    assert plan.migrations == {"a": 0, "b": 2}
    assert o.on_failure([1], "crash", owners) is None, "already out: nothing changes"


def test_a_loss_the_liveness_authority_recorded_first_is_planned_once():
    o = _orch()
    o.membership.fail([1, 3], state=RankState.FENCED)  # the authority: one bump for both
    plan = o.on_failure([1, 3], "hang", {"a": 1, "b": 3, "c": 0})
    assert plan.view.epoch == 1 and plan.failed == (1, 3)
    assert plan.migrations == {"a": 2, "b": 0}
    assert o.on_failure([3], "hang", {}) is None
    o.membership.begin_join([3])
    o.on_join([3])
    o.membership.fail([3])
    assert o.on_failure([3], "crash", {"x": 3}).migrations == {"x": 0}


def test_losing_both_replicas_is_reported_and_hang_fences():
    o = _orch()
    o.on_failure([1], "crash", {})
    plan = o.on_failure([3], "hang", {"x": 3})
    assert plan.view.states[3] is RankState.FENCED and plan.view.epoch == 2
    assert plan.uncovered == [(0, 2), (0, 3)]
    # Repair evicts the spare replicas of experts 0 and 1 on ranks 0 and 2: two weight copies.
    assert plan.replan.moved_experts == 2 and plan.replan.unrepairable == []
    assert plan.replan.repaired_layout.uncovered([0, 2]) == []
    assert plan.migrations == {"x": 0}


@pytest.mark.parametrize("overrides", [
    pytest.param(["recovery.migrate_requests=false"], id="migration_off"),
    pytest.param(["recovery.max_failures=1"], id="too_many_failures"),
])
def test_requests_abandoned_by_policy(overrides):
    o = _orch(ResilienceConfig().with_overrides(overrides))
    o.on_failure([0], "crash", {})
    plan = o.on_failure([1], "crash", {"r": 1})
    assert plan.abandoned == ["r"] and plan.migrations == {}


def test_every_rank_lost():
    o = _orch()
    o.on_failure([0, 1, 2], "crash", {})
    plan = o.on_failure([3], "crash", {"r": 3})
    assert plan.view.live_ranks == () and plan.abandoned == ["r"]
    with pytest.raises(ValueError, match="kind"):
        o.on_failure([0], "melted", {})


def test_join_restores_the_initial_slots():
    o = _orch()
    o.on_failure([1], "crash", {})
    o.membership.begin_join([1])
    plan = o.on_join([1])
    assert plan.view.epoch == 2 and plan.view.live_ranks == (0, 1, 2, 3)
    assert plan.layout.physical_to_logical.tolist() == o.initial_layout.physical_to_logical.tolist()
    assert plan.uncovered == []


def test_repair_vacates_then_fills_and_later_replans_keep_it():
    # 4 ranks x 2 slots, 6 experts: 0 and 1 have two replicas, 2..5 one.
    lay = ExpertLayout.from_mapping([[0, 2, 1, 3, 0, 4, 1, 5]], num_ranks=4, num_experts=6)
    o = RecoveryOrchestrator(Membership(4), lay)
    plan = o.on_failure([1], "crash", {})
    assert plan.uncovered == [(0, 3)]
    moves = plan.replan.moves
    assert len(moves) == 1 and moves[0].expert == 3 and moves[0].evicted in (0, 1), "over a spare replica"
    vac = o.vacate(moves)
    assert vac.physical_to_logical[0, moves[0].slot] == -1
    assert vac.uncovered([0, 2, 3]) == [(0, 3)]
    fixed = o.repaired(moves)
    assert fixed.uncovered([0, 2, 3]) == [] and o.uncovered == set()
    # A second failure replans from what the slots really hold now.
    plan2 = o.on_failure([3], "crash", {})
    assert (0, 3) not in plan2.uncovered
    assert plan2.layout.physical_to_logical[0, moves[0].slot] == 3


def test_a_request_in_flight_at_max_request_failures_deaths_is_not_moved_again():
    from resilient_ep.recovery import assign_requests

    a = assign_requests({"p": 1, "q": 1, "r": 0}, [1], [0, 2], deaths={"p": 1, "q": 0},
                        max_request_failures=2)
    assert a.exhausted == ["p"] and a.migrations == {"q": 2} and a.abandoned == []
    assert assign_requests({"p": 1}, [1], [0], deaths={"p": 5}).migrations == {"p": 0}, \
        "0: no limit"
    o = _orch(ResilienceConfig().with_overrides(["recovery.max_request_failures=1"]))
    plan = o.on_failure([1], "crash", {"a": 1, "b": 0})
    assert plan.exhausted == ["a"] and plan.migrations == {}


def test_moved_requests_are_kept_apart_so_a_poison_request_meets_its_limit_alone():
    """A request that kills every rank it runs on (p) and an innocent one (q) are both moved
    off rank 0; they go to different ranks, so when p kills its second rank, q was not there
    and is not failed with it."""
    from resilient_ep.recovery import assign_requests

    owners = {"p": 0, "q": 0, "a": 1, "b": 2, "c": 3}
    first = assign_requests(owners, [0], [1, 2, 3], max_request_failures=2)
    assert first.migrations["p"] != first.migrations["q"]
    owners.update(first.migrations)
    dead = first.migrations["p"]
    second = assign_requests(owners, [dead], [r for r in (1, 2, 3) if r != dead],
                             deaths={"p": 1, "q": 1}, max_request_failures=2)
    assert second.exhausted == ["p"], second
    # A rank already holding a suspect is the last choice for the next one, load aside.
    spread = assign_requests({"s": 1, "x": 2, "y": 2, "v": 0}, [0], [1, 2],
                             deaths={"s": 1})
    assert spread.migrations == {"v": 2}


def test_losses_repairs_and_rejoins_in_any_order_keep_routing_within_its_table():
    """Seeded random sequences of losses, weight repairs, rejoins of fresh processes and
    fenced ranks taken back as they are (what ``resilient-ep chaos`` found: a repaired copy
    plus a rejoined rank's own copy made three replicas of an expert, above the routing
    table's width of two; and a fenced rank taken back was routed as if it held its initial
    experts, not the repaired copies it did hold). Against an independent model of what every
    slot holds: the routing layout has the table's width, routes only to live slots that hold
    the expert, and covers every expert some live slot holds."""
    import random

    from resilient_ep.placement import SlotMove, place

    for seed in range(40):
        rng = random.Random(seed)
        lay = place(num_layers=2, num_experts=8, num_ranks=4, slots_per_rank=4)
        o = RecoveryOrchestrator(Membership(4), lay, ResilienceConfig())
        k = lay.max_replicas
        truth = lay.physical_to_logical.clone()  # what each slot's weights are
        for _ in range(40):
            view = o.membership.view()
            live, out = list(view.live_ranks), [r for r in range(4) if not view.is_live(r)]
            if out and (len(live) <= 2 or rng.random() < 0.4):
                r = rng.choice(out)
                fresh = view.states[r] is RankState.DEAD or rng.random() < 0.5
                if fresh:  # a new process loads the rank's initial slots
                    sl = list(lay.slots_of_rank(r))
                    truth[:, sl] = lay.physical_to_logical[:, sl]
                o.membership.begin_join([r])
                layout = o.on_join([r], reloaded=fresh).layout
            else:
                plan = o.on_failure([rng.choice(live)], rng.choice(["crash", "hang"]), {})
                layout = plan.layout
                if plan.replan.moves:  # the repair copies land
                    o.vacate(plan.replan.moves)
                    for m in plan.replan.moves:
                        truth[m.layer, m.slot] = m.expert
                    layout = o.repaired([SlotMove(*m.__dict__.values())
                                         for m in plan.replan.moves])
            assert layout.max_replicas == k
            view = o.membership.view()
            routed = layout.physical_to_logical
            for layer in range(2):
                for slot, e in enumerate(routed[layer].tolist()):
                    if e >= 0:
                        assert view.is_live(slot // 4) and truth[layer, slot] == e, (seed, layer, slot)
                live_held = {e for slot, e in enumerate(truth[layer].tolist())
                             if e >= 0 and view.is_live(slot // 4)}
                assert set(routed[layer].tolist()) - {-1} == live_held


def test_requests_leave_a_failing_node_for_another():
    """Several hosts: node 1 (ranks 2, 3) fails whole but is seen one rank at a time. Rank 3's
    requests go to node 0 even though rank 2 is idle and still live, so the requests do not
    die twice; with no other node left, a node-mate takes them."""
    from resilient_ep.recovery import assign_requests

    nodes = {0: 0, 1: 0, 2: 1, 3: 1}
    owners = {"a": 0, "b": 0, "c": 1, "x": 3, "y": 3}
    a = assign_requests(owners, [3], [0, 1, 2], nodes=nodes)
    assert set(a.migrations.values()) <= {0, 1} and a.migrations == {"x": 1, "y": 0}
    assert assign_requests(owners, [3], [0, 1, 2]).migrations["x"] == 2  # one host: least work
    assert assign_requests({"x": 3}, [3], [2], nodes=nodes).migrations == {"x": 2}


def test_a_join_prepared_ahead_equals_one_computed_at_the_switch_and_goes_stale():
    """``prepare_join`` (when the join is heard) then ``on_join(prepared=...)`` gives what
    ``on_join`` alone gives, over random histories; a loss or a finished repair between the
    two makes the prepared join stale, and ``on_join`` computes afresh (the same result as
    never having prepared)."""
    import random

    from resilient_ep.placement import place

    for seed in range(30):
        rng = random.Random(seed)
        lay = place(num_layers=2, num_experts=8, num_ranks=4, slots_per_rank=3)
        a = RecoveryOrchestrator(Membership(4), lay, ResilienceConfig())
        b = RecoveryOrchestrator(Membership(4), lay, ResilienceConfig())
        for _ in range(12):
            live = list(a.membership.view().live_ranks)
            out = [r for r in range(4) if r not in live]
            if out and (len(live) <= 1 or rng.random() < 0.5):
                r = rng.choice(out)
                fresh = rng.random() < 0.7
                prepared = b.prepare_join([r], reloaded=fresh)
                assert b.membership.view().states[r] is not RankState.LIVE  # nothing changed
                if rng.random() < 0.3 and len(live) > 1:  # a loss between heard and switch
                    victim = rng.choice(live)
                    a.on_failure([victim], "crash", {})
                    b.on_failure([victim], "crash", {})
                    if rng.random() < 0.5 and r == victim:
                        continue
                ja = a.on_join([r], reloaded=fresh)
                jb = b.on_join([r], reloaded=fresh, prepared=prepared)
                used = jb.layout is prepared.layout
                assert used == (prepared.epoch + 1 == jb.view.epoch), seed
                assert ja.view == jb.view and ja.uncovered == jb.uncovered
            else:
                victim = rng.choice(live)
                a.on_failure([victim], "crash", {})
                b.on_failure([victim], "crash", {})
            assert a.layout.physical_to_logical.equal(b.layout.physical_to_logical)
            assert a.physical.physical_to_logical.equal(b.physical.physical_to_logical)
        assert a.uncovered == b.uncovered
