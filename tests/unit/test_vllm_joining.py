"""The engine side of a rejoin on vLLM without vLLM: the survivors' agreement on a join in
their busy sum, the replacement adopting where they are, its expert view replayed from the
authority's log (equal to the survivors'), and its private torch.distributed world."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import pytest
import torch

from resilient_ep.config import PlacementConfig, RepairConfig, ResilienceConfig
from resilient_ep.engines.vllm.experts import ExpertPlan, ExpertState
from resilient_ep.engines.vllm.joining import EngineJoin, history_of
from resilient_ep.liveness import RankJoin, RankLoss


class _Group:
    def __init__(self, rank, others):
        self.rank, self.others, self.sent = rank, others, []

    def allgather(self, tensors, strict=True):
        self.sent.append(tensors[0].tolist())
        return {self.rank: tensors, **{r: [t] for r, t in self.others.items()}}


def _join(rank: int, joined: bool, incarnation: int = 0, latest: int = 0):
    j = object.__new__(EngineJoin)
    j.engine = SimpleNamespace(step_counter=17, current_wave=5, engines_running=True)
    j.rank, j.joined, j.latest = rank, joined, latest
    j._incarnation = lambda kind: incarnation
    j.switched, j.switches, j.worker_switch, j.heard_at = [], [], [], 0.0
    j.core_switch = {}
    j.engine.scheduler = SimpleNamespace(has_requests=lambda: True)
    j._measuring = None
    return j


def _sum(*joins):
    return {r: [torch.tensor([1, 0, e], dtype=torch.int32)] for r, e in enumerate(joins)}


def test_survivors_switch_only_when_every_one_names_the_same_join():
    j = _join(0, joined=True, latest=4)
    group = _Group(0, {})
    j._switch = lambda epoch: (j.switched.append(epoch), (group, lambda: None))[1]
    j.after_sum(_sum(4, 0, 4), has_unfinished=True)  # DP1 has not heard of it yet
    assert j.switched == []
    j.after_sum(_sum(0, 0), has_unfinished=True)  # no join anywhere
    assert j.switched == []
    j.after_sum(_sum(4, 4, 4), has_unfinished=True)
    assert j.switched == [4]
    assert group.sent == [[17, 5, 1]]  # where the survivors are, for the joined rank
    done = _join(0, joined=True, incarnation=4, latest=4)  # already on the join's groups
    done._switch = lambda epoch: done.switched.append(epoch)
    done.after_sum(_sum(4, 4), has_unfinished=False)
    assert done.switched == []


def test_the_replacement_takes_the_survivors_step_and_wave():
    busy = _join(1, joined=False, latest=3)
    busy.engine.step_counter, busy.engine.current_wave, busy.engine.engines_running = 0, 0, False
    group = _Group(1, {0: torch.tensor([33, 9, 1]), 2: torch.tensor([33, 9, 1])})
    busy._switch = lambda epoch: (busy.switched.append(epoch), (group, lambda: None))[1]
    busy._flip(3)
    e = busy.engine
    assert busy.joined and busy.switched == [3] and group.sent == [[-1, -1, -1]]
    assert (e.step_counter, e.current_wave, e.engines_running) == (33, 9, True)

    idle = _join(1, joined=False, latest=3)
    group = _Group(1, {0: torch.tensor([1, 9, 0])})
    idle._switch = lambda epoch: (group, lambda: None)
    idle._flip(3)
    e = idle.engine  # the survivors just ended wave 9: the next one starts at step 0
    assert (e.step_counter, e.current_wave, e.engines_running) == (0, 10, False)


def test_the_workers_switch_overlaps_the_core_switch_and_is_awaited_before_the_next_step(
        monkeypatch):
    """The workers' switch is sent without waiting (vLLM's executor runs it before any later
    call); the core switches and says hello meanwhile; the engine waits for the workers'
    answer before it returns to its busy loop (their errors surface there)."""
    import types

    order = []

    class Pending:
        def result(self):
            order.append("workers answered")
            return [{"experts_ms": 0.5, "group_ms": 2.0, "group_parts": {}, "experts_prepared": True}]

    class Executor:
        def collective_rpc(self, method, args=(), non_block=False, **kw):
            assert method == "resilient_ep_switch_groups" and non_block, (method, non_block)
            order.append("workers sent")
            return Pending()

    j = _join(0, joined=True, latest=4)
    j.engine.model_executor = Executor()
    j.engine.vllm_config = None
    j.replica = SimpleNamespace(events=lambda: [RankLoss(1, "exit", -9, 1.0, 1),
                                                RankJoin(1, 2.0, 4)])
    group = _Group(0, {})
    real_allgather = group.allgather
    group.allgather = lambda t, strict=True: (order.append("hello"), real_allgather(t))[1]
    groups = types.ModuleType("resilient_ep.engines.vllm.groups")  # (the real one needs psutil)
    groups.switch_parts = {}
    groups.switch_core_group = lambda cfg, epoch: (order.append("core switched"), group)[1]
    monkeypatch.setitem(sys.modules, groups.__name__, groups)
    j.after_sum(_sum(4, 4), has_unfinished=True)
    assert order == ["workers sent", "core switched", "hello", "workers answered"]
    [record] = j.switches
    assert record["workers"] == [{"experts_ms": 0.5, "group_ms": 2.0, "group_parts": {},
                                  "experts_prepared": True}]
    assert record["workers_wait_ms"] >= 0


def test_history_stops_at_the_join():
    log = [RankLoss(1, "exit", -9, 1.0, 1), RankLoss(2, "hang", None, 2.0, 2),
           RankJoin(1, 3.0, 3), RankLoss(3, "exit", -9, 4.0, 4)]
    assert history_of(log, 3) == [{"kind": "loss", "rank": 1, "epoch": 1},
                                  {"kind": "loss", "rank": 2, "epoch": 2},
                                  {"kind": "join", "rank": 1, "epoch": 3}]


def test_a_replacement_replays_the_log_into_the_survivors_expert_view():
    """DP=4 with one redundant slot per rank: two deaths, repairs, a rejoin of the first.
    The replacement (fresh state, replaying the log) and a survivor (applying each event as
    it came) agree on every slot and on what serves each expert."""
    cfg = ResilienceConfig(placement=PlacementConfig(redundant_slots_per_rank=1),
                           repair=RepairConfig(host_backup=False))
    plan = ExpertPlan(8, 4, cfg)

    survivor = ExpertState(plan, 3, cfg)
    survivor.set_dead({1})
    survivor.set_dead({1, 2})
    survivor.set_joined({1})

    replacement = ExpertState(ExpertPlan(8, 4, cfg), 1, cfg)
    history = [{"kind": "loss", "rank": 1, "epoch": 1}, {"kind": "loss", "rank": 2, "epoch": 2},
               {"kind": "join", "rank": 1, "epoch": 3}]
    replacement._ensure_thread = lambda: pytest.fail("a replay copies nothing")
    replacement.replay(history, lambda d: {d})
    assert replacement._jobs.empty() and not replacement._pending

    assert torch.equal(replacement.recovery.physical.physical_to_logical,
                       survivor.recovery.physical.physical_to_logical)
    assert torch.equal(replacement.recovery.layout.physical_to_logical,
                       survivor.recovery.layout.physical_to_logical)
    assert replacement.membership.view().live_ranks == survivor.membership.view().live_ranks \
        == (0, 1, 3)
    # the joined rank holds its initial slots again, and nothing waits on a copy into them
    S = plan.slots_per_rank
    assert torch.equal(replacement.recovery.physical.physical_to_logical[0, S:2 * S],
                       plan.layout.physical_to_logical[0, S:2 * S])
    assert all(slot // S != 1 for slot in survivor._pending)
    assert [m for m in survivor.moves if "joined" in m] == [
        m for m in replacement.moves if "joined" in m]


def test_the_private_world_keeps_groups_inside_the_rank_real_and_fakes_the_rest():
    """One subprocess (a torch.distributed world per process): the world's geometry, a fake
    group across ranks, a real one inside, and a refusal for several workers per rank."""
    code = textwrap.dedent("""
        from types import SimpleNamespace
        import torch, torch.distributed as dist
        from resilient_ep.engines.vllm.joining import init_private_world
        def cfg(rank, size):
            return SimpleNamespace(parallel_config=SimpleNamespace(
                data_parallel_rank=rank, world_size_across_dp=size))
        try:
            init_private_world(cfg(1, 4), 2, 0)
        except NotImplementedError as e:
            print("refused:", e)
        init_private_world(cfg(2, 4), 1, 0)
        assert dist.get_rank() == 2 and dist.get_world_size() == 4
        everyone = dist.new_group([0, 1, 2, 3], backend="gloo")
        assert dist.get_backend(everyone) == "fake"
        mine = dist.new_group([2], backend="gloo")
        assert dist.get_backend(mine) == "gloo"
        assert dist.new_group([1], backend="gloo") == dist.GroupMember.NON_GROUP_MEMBER
        t = torch.ones(3)
        dist.all_reduce(t, group=everyone)  # does nothing, answers at once
        print("ok", t.tolist())
        init_private_world(cfg(0, 8), 2, 0)  # formed already: left alone, no refusal
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok [1.0, 1.0, 1.0]" in out.stdout
    assert "refused:" in out.stdout and "2 workers (TP x PP > 1)" in out.stdout


def test_a_replacement_takes_part_only_in_its_own_join():
    """A replacement replays the whole log when it subscribes: the joins before its own are
    history, even those the process it replaces took part in (CI-found twice: DP1's
    replacement flipped to DP0's older join; then, DP1 having been live at DP2's join, to
    that one, and hung in its hello)."""
    from resilient_ep.engines.vllm.replacement import own_join_epoch, takes_part

    log = [RankLoss(0, "exit", -9, 1.0, 1), RankLoss(2, "exit", -9, 1.0, 2), RankJoin(2, 2.0, 3),
           RankLoss(1, "exit", -9, 3.0, 4), RankJoin(0, 4.0, 5)]
    joins = [j.epoch for j in log if isinstance(j, RankJoin)]
    assert own_join_epoch(log, 1) is None  # DP1's replacement, warming: no join is its own
    assert not any(takes_part(log, 1, e, replacement=True) for e in joins)
    log += [RankJoin(1, 5.0, 6), RankJoin(3, 6.0, 8)]
    joins = [j.epoch for j in log if isinstance(j, RankJoin)]
    assert own_join_epoch(log, 1) == 6
    assert [takes_part(log, 1, e, replacement=True) for e in joins] == [False, False, True, True]
    # a replacement lost again and replaced once more: only the newest join is its own
    log += [RankLoss(1, "exit", -9, 7.0, 9), RankJoin(1, 8.0, 10)]
    assert own_join_epoch(log, 1) == 10 and not takes_part(log, 1, 6, replacement=True)
    assert all(takes_part(log, 3, e.epoch, replacement=False) for e in log)  # never left


def test_a_second_replacement_replaying_the_log_skips_its_predecessors_join():
    """DP2 lost (epoch 1), its replacement joined (3), lost again (4): the second replacement,
    started at epoch 4, replays the log; after the first join is applied and before the loss
    that follows it, the first join looks like the rank's newest. It is not this process's:
    the join it takes part in comes after the epoch it was started at (a local chaos run:
    the second replacement flipped to epoch 3 and hung in the hello for 120 s)."""
    from resilient_ep.engines.vllm.replacement import takes_part

    log = [RankLoss(2, "exit", -9, 1.0, 1), RankJoin(2, 2.0, 3), RankLoss(2, "exit", -9, 3.0, 4),
           RankLoss(3, "exit", -9, 4.0, 5), RankJoin(3, 5.0, 6), RankJoin(2, 6.0, 7)]
    replaying = log[:2]  # the subscriber has applied the first join, not the loss after it
    assert takes_part(replaying, 2, 3, replacement=True, since=0)  # (without the start epoch)
    assert not takes_part(replaying, 2, 3, replacement=True, since=4)
    assert not takes_part(log[:5], 2, 6, replacement=True, since=4)  # DP3's: not yet its own
    assert takes_part(log, 2, 7, replacement=True, since=4)
    assert not takes_part(log, 2, 3, replacement=True, since=4)

def test_a_replacement_that_hangs_in_its_start_is_stopped_and_started_again(monkeypatch):
    """The rejoin's start watchdog: the first replacement never reaches READY, so it is
    stopped (and its loss seen by the authority) and another is started; the rejoin then
    goes on. When every start hangs, the rejoin fails (the rank stays out)."""
    from resilient_ep.engines.vllm import rejoin

    class Liveness:
        def __init__(self):
            self.admitted = []

        def admit(self, rank):
            self.admitted.append(rank)
            return SimpleNamespace(epoch=7)

    host = SimpleNamespace(dead=lambda: {1}, monitor=Liveness(),
                           rejoined=lambda rank, epoch: None)
    r = rejoin.Rejoiner(host)
    starts, stopped = [], []

    def start(rank, record, export):
        starts.append(rank)
        record["_proc"] = f"proc{len(starts)}"
        if len(starts) == 1:
            raise rejoin.StartTimeout("not READY within 150 s of its start")

    monkeypatch.setattr(r, "_export", lambda rank, record: None)
    monkeypatch.setattr(r, "_start", start)
    monkeypatch.setattr(r, "_stop_replacement", lambda rank, proc: stopped.append(proc))
    monkeypatch.setattr(r, "_verify", lambda rank, record, export: None)
    monkeypatch.setattr(r, "_wait_switched", lambda rank, epoch: None)
    record = {"rank": 1, "state": "queued"}
    r._rejoin(1, record)
    assert starts == [1, 1] and stopped == ["proc1"] and record["attempts"] == 2
    assert record["state"] == "live" and host.monitor.admitted == [1]

    def hang(rank, record, export):
        record["_proc"] = "procN"
        raise rejoin.StartTimeout("not READY")

    monkeypatch.setattr(r, "_start", hang)
    stopped.clear()
    with pytest.raises(rejoin.StartTimeout):
        r._rejoin(1, {"rank": 1, "state": "queued"})
    assert stopped == ["procN"] * rejoin.START_ATTEMPTS


def test_a_replacement_ready_but_deaf_to_its_checks_is_stopped_and_started_again(monkeypatch):
    """A replacement that reached READY but does not answer the verification's call (hung
    after its start: seen in CI) is a start that failed: stopped, another started, and the
    rejoin goes on; a mismatch in the checks is not retried (a second start would load the
    same weights)."""
    from resilient_ep.engines.vllm import rejoin

    host = SimpleNamespace(dead=lambda: {2}, rejoined=lambda rank, epoch: None, num_ranks=4,
                           monitor=SimpleNamespace(admit=lambda rank: SimpleNamespace(epoch=5)))
    r = rejoin.Rejoiner(host)
    calls, stopped = [], []

    def call(engine, utility, args, timeout_s, watch_loss=True):
        calls.append((engine, args[0]))
        if engine == 2 and len(stopped) == 0:
            raise TimeoutError(f"DP2 did not answer {utility} in {timeout_s} s")
        return [{"dense_digest": "d", "experts": {"mismatched": []}, "dense": {}}]

    host.call = call
    monkeypatch.setattr(r, "_export", lambda rank, record: None)
    monkeypatch.setattr(r, "_start", lambda rank, record, export: record.update(_proc="p"))
    monkeypatch.setattr(r, "_stop_replacement", lambda rank, proc: stopped.append(proc))
    monkeypatch.setattr(r, "_wait_switched", lambda rank, epoch: None)
    monkeypatch.setattr("resilient_ep.probe.compare", lambda a, b, names: [])
    record = {"rank": 2, "state": "queued"}
    r._rejoin(2, record)
    assert stopped == ["p"] and record["attempts"] == 2 and record["state"] == "live"
    assert "READY, but no answer to resilient_ep_verify" in record["retried"][0]

    def differs(engine, utility, args, timeout_s, watch_loss=True):
        return [{"dense_digest": "mine" if engine == 2 else "theirs"}]

    host.call = differs
    stopped.clear()
    with pytest.raises(RuntimeError, match="dense weights differ"):
        r._rejoin(2, {"rank": 2, "state": "queued"})
    assert stopped == []


def test_a_survivor_plans_a_join_when_it_hears_it_and_only_writes_the_maps_at_the_switch():
    """The expert side of a join is computed when the join is heard (``prepare_joined``): at
    the switch the maps written equal those of a survivor that computed everything at the
    switch; a loss heard in between makes the prepared plan stale (computed afresh)."""
    cfg = ResilienceConfig(placement=PlacementConfig(redundant_slots_per_rank=1),
                           repair=RepairConfig(host_backup=False))
    plan = ExpertPlan(8, 4, cfg)

    def survivor():
        s = ExpertState(plan, 3, cfg)
        s._ensure_thread = lambda: None  # (no copy thread: the slots here are maps only)
        s.register(None, torch.zeros(8, dtype=torch.int32), "l0")
        s.set_dead({1}, copy=False)
        s.set_dead({1, 2}, copy=False)
        return s

    ahead, at_switch = survivor(), survivor()
    ahead.prepare_joined({1})
    ahead.set_joined({1})
    at_switch.set_joined({1})
    assert ahead.counters["joins_prepared"] == 1
    assert at_switch.counters["joins_computed_at_switch"] == 1
    assert torch.equal(ahead.layers[0].active, at_switch.layers[0].active)
    assert torch.equal(ahead.recovery.layout.physical_to_logical,
                       at_switch.recovery.layout.physical_to_logical)

    stale = survivor()
    stale.prepare_joined({1, 2})
    stale.set_dead({0, 1, 2}, copy=False)  # DP0 lost between the news and the switch
    stale.set_joined({1, 2})
    fresh = survivor()
    fresh.set_dead({0, 1, 2}, copy=False)
    fresh.set_joined({1, 2})
    assert stale.counters["joins_computed_at_switch"] == 1
    assert torch.equal(stale.layers[0].active, fresh.layers[0].active)


class _Replica:
    """A membership replica that has heard ``events`` (DP ranks of 4)."""

    def __init__(self, events=()):
        from resilient_ep.membership import Membership

        self.membership = Membership(4)
        self._events = []
        for e in events:
            self.hear(e)

    def hear(self, e):
        if isinstance(e, RankJoin):
            self.membership.join([e.rank])
        else:
            self.membership.fail([e.rank])
        self._events.append(e)

    def events(self):
        return list(self._events)


def _replacement(monkeypatch, replica):
    """DP1's replacement, not joined, whose flip switches to a group where DP0 is busy."""
    import queue

    monkeypatch.setenv("RESILIENT_EP_REJOIN", "1")
    fake = SimpleNamespace(EngineCoreRequestType=SimpleNamespace(WAKEUP="wakeup"))
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.v1", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.v1.engine", fake)
    j = _join(1, joined=False)
    j.engine.step_counter, j.engine.engines_running = 0, False
    j.engine.input_queue = queue.Queue()
    j._lock, j.replica, j.held, j.held_total = threading.Lock(), replica, [], 0
    j.flipped_by_request = 0
    group = _Group(1, {0: torch.tensor([40, 3, 1])})
    j._switch = lambda epoch: (j.switched.append(epoch), (group, lambda: None))[1]
    return j


def test_a_request_before_the_replacement_heard_of_its_admission_is_held_until_the_flip(
        monkeypatch):
    """The front end routes to a rank from its admission on; a replacement that has not
    heard of it yet must not run the request on its solo groups (CI: one completion whose
    prefill had every expert missing). It holds it, drops it on an abort, and hands it on in
    order once it has flipped."""
    loss = RankLoss(1, "exit", -9, 1.0, 1)
    replica = _Replica([loss])
    j = _replacement(monkeypatch, replica)
    assert j.before_request("add", "a", "item-a") is False
    assert j.before_request("add", "b", "item-b") is False
    assert j.before_request("add", "c", "item-c") is False
    assert j.before_request("abort", ["b"], None) is True
    assert j.switched == [] and not j.joined and j.take_held() == []
    assert j.before_request("utility", "", None) is True  # (status calls go on)

    replica.hear(RankJoin(1, 2.0, 2))  # the news arrives, the busy loop wakes
    j._heard(RankJoin(1, 2.0, 2))
    assert j.engine.input_queue.get_nowait() == ("wakeup", None)
    j.on_wake()
    assert j.joined and j.switched == [2]
    assert (j.engine.step_counter, j.engine.current_wave) == (40, 3)
    assert j.take_held() == ["item-a", "item-c"] and j.take_held() == []
    assert j.held_total == 3
    assert j.before_request("add", "d", "item-d") is True  # joined: taken as it comes


def test_a_request_after_the_admission_reached_the_replica_flips_the_replacement_first(
        monkeypatch):
    """The replica holds the admission but its news (the WAKEUP) is still on the way: the
    request flips the replacement at once, then is taken."""
    replica = _Replica([RankLoss(1, "exit", -9, 1.0, 1), RankJoin(1, 2.0, 2)])
    j = _replacement(monkeypatch, replica)
    assert j.before_request("add", "a", "item-a") is True
    assert j.joined and j.switched == [2] and j.held == [] and j.held_total == 0
    assert j.flipped_by_request == 1
    j.on_wake()  # the late wake-up: nothing left to do
    assert j.switched == [2]


def test_a_survivor_takes_every_request():
    j = _join(0, joined=True)
    j.held, j.held_total, j.flipped_by_request = [], 0, 0
    assert j.before_request("add", "a", "item-a") is True and j.held == []
