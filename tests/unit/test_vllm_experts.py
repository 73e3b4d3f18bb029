"""The vLLM adapter's expert side without vLLM: the core's placement in expert maps, one
active copy per expert, repair into slots while the MoE pass waits, shadows, fallbacks."""

import threading
import time

import pytest
import torch

from resilient_ep.active_experts import active_slots
from resilient_ep.config import ResilienceConfig
from resilient_ep.engines.vllm import experts
from resilient_ep.engines.vllm.experts import ExpertPlan, ExpertState
from resilient_ep.repair import HostBackup


def _cfg(*over):
    return ResilienceConfig().with_overrides(list(over))


class FakeExperts(torch.nn.Module):
    """What the adapter reads of vLLM's RoutedExperts: per-slot parameters, a layer name."""

    def __init__(self, plan: ExpertPlan, rank: int, name: str):
        super().__init__()
        S = plan.slots_per_rank
        self.local_num_experts = S
        self.layer_name = name
        self.w13_weight = torch.nn.Parameter(torch.full((S, 4, 3), -1.0), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.full((S, 3, 2), -1.0), requires_grad=False)
        held = plan.held_map(rank)
        for e in range(plan.E):  # "loaded": every held slot holds the expert's weights
            if held[e] >= 0:
                self.w13_weight.data[held[e]] = weights(name, e)["w13_weight"]
                self.w2_weight.data[held[e]] = weights(name, e)["w2_weight"]


def weights(name: str, e: int) -> dict:
    g = torch.Generator().manual_seed(hash((name, e)) % 2**31)
    return {"w13_weight": torch.randn(4, 3, generator=g), "w2_weight": torch.randn(3, 2, generator=g)}


def _loaded(cfg, tmp_path, E=8, N=4):
    """A plan, a host backup and every rank's state, the weights "loaded" (backup filled)."""
    plan = ExpertPlan(E, N, cfg)
    backup = HostBackup(tmp_path / "experts")
    states = _states(plan, cfg, backup)
    for s in states:
        s.after_load()
    return plan, backup, states


def _states(plan, cfg, backup=None, layers=("model.layers.0.mlp.experts",)):
    out = []
    for r in range(plan.N):
        s = ExpertState(plan, r, cfg, backup=backup)
        for name in layers:
            m = FakeExperts(plan, r, name)
            s.register(m, plan.held_map(r).clone(), name)
        out.append(s)
    return out


def _servers(states, live):
    """expert -> the ranks serving it (from each live rank's active map)."""
    out = {}
    for s in states:
        if s.rank in live:
            for e, slot in enumerate(s.layers[0].active.tolist()):
                if slot >= 0:
                    out.setdefault(e, []).append(s.rank)
    return out


def test_default_is_the_full_mirror_and_one_death_uncovers_nothing():
    plan = ExpertPlan(8, 4, _cfg())
    assert plan.regular == 4 and plan.layout.replica_count.tolist() == [[2] * 8]
    for dead in range(4):
        states = _states(plan, _cfg())
        for s in states:
            s.set_dead({dead})
        live = set(range(4)) - {dead}
        srv = _servers(states, live)
        assert sorted(srv) == list(range(8)) and all(len(v) == 1 for v in srv.values())
        assert all(not s.moves for s in states)


@pytest.mark.parametrize("E,N,redundant", [(8, 4, 1), (7, 2, 3), (10, 4, 0), (6, 3, 2)])
def test_any_expert_count_each_expert_served_once(E, N, redundant):
    plan = ExpertPlan(E, N, _cfg(f"placement.redundant_slots_per_rank={redundant}"))
    states = _states(plan, _cfg())
    srv = _servers(states, set(range(N)))
    assert sorted(srv) == list(range(E)) and all(len(v) == 1 for v in srv.values())
    # what a rank serves it holds, in the slot vLLM's loader filled
    for s in states:
        held = plan.held_map(s.rank)
        for e, slot in enumerate(s.layers[0].active.tolist()):
            assert slot < 0 or slot == held[e]


def test_partial_budget_death_repairs_from_the_host_backup_while_the_pass_waits(tmp_path):
    cfg = _cfg("placement.redundant_slots_per_rank=1", "repair.host_backup=true")
    plan, backup, states = _loaded(cfg, tmp_path)
    assert backup.experts() == {"model.layers.0.mlp.experts": list(range(8))}
    single = [e for e in range(8) if plan.layout.replica_count[0, e] == 1]
    victim = next(r for r in range(4) if set(plan.layout.experts_on_rank(0, r)) & set(single))
    lost = sorted(set(plan.layout.experts_on_rank(0, victim)) & set(single))
    ptrs = [s.layers[0].active.data_ptr() for s in states]
    gate = threading.Event()
    real_get = backup.get

    def slow_get(layer, e):  # the copy lands only once the MoE pass is waiting for it
        gate.wait(5)
        return real_get(layer, e)

    backup.get = slow_get
    live = set(range(4)) - {victim}
    for s in states:
        s.set_dead({victim})
    assert [s.layers[0].active.data_ptr() for s in states] == ptrs  # written in place
    targets = {m["rank"] for m in states[0].moves}
    assert sorted(m["expert"] for m in states[0].moves) == lost and victim not in targets
    assert all(s.moves == states[0].moves for s in states)  # every worker plans alike
    t = next(s for s in states if s.rank in targets)
    e = next(m["expert"] for m in t.moves if m["rank"] == t.rank)
    assert t.layers[0].active[e] == -1  # not served until the weights are there
    done = []
    waiter = threading.Thread(target=lambda: (t.before_moe(t.layers[0].active,
                                                           torch.tensor([[e, 0]])),
                                              done.append(time.monotonic()), t.after_moe()))
    waiter.start()
    time.sleep(0.2)
    assert not done  # the pass holds the token for its expert
    gate.set()
    waiter.join(5)
    assert done and t.counters["waits"] == 1 and not t.counters.get("wait_timeouts")
    deadline = time.monotonic() + 5
    while any(s._pending for s in states) and time.monotonic() < deadline:
        time.sleep(0.01)
    slot = int(t.layers[0].active[e])
    assert slot >= 0
    assert torch.equal(t.layers[0].module.w13_weight.data[slot],
                       weights("model.layers.0.mlp.experts", e)["w13_weight"])
    srv = _servers(states, live)
    assert sorted(srv) == list(range(8)) and all(len(v) == 1 for v in srv.values())
    assert t.status()["repair"]["by_source"]["host"]["copies"] >= 1


def test_a_failing_source_falls_back_to_the_next(tmp_path, monkeypatch):
    cfg = _cfg("placement.redundant_slots_per_rank=0", "repair.host_backup=true")
    plan, backup, states = _loaded(cfg, tmp_path)
    backup.remove()  # the backup is gone (node rebooted its shm, say)
    monkeypatch.setattr(experts, "disk_expert",
                        lambda module, model_dir, e: weights(module.layer_name, e))
    # no free slot and no spare replica: with redundancy 0 a death is not repairable
    for s in states:
        s.set_dead({1})
    assert states[0].uncovered == plan.layout.experts_on_rank(0, 1)
    assert not states[0].moves

    cfg = _cfg("placement.redundant_slots_per_rank=1", "repair.host_backup=true")
    plan = ExpertPlan(8, 4, cfg)
    states = _states(plan, cfg, backup)
    backup.put("model.layers.0.mlp.experts", 0, {"w13_weight": torch.zeros(1)})  # corrupt
    single = [e for e in range(8) if plan.layout.replica_count[0, e] == 1]
    victim = next(r for r in range(4) if set(plan.layout.experts_on_rank(0, r)) & set(single))
    for s in states:
        s.model_dir = "unused"
        s.set_dead({victim})
    deadline = time.monotonic() + 5
    while any(s._pending for s in states) and time.monotonic() < deadline:
        time.sleep(0.01)
    used = {k for s in states for k, v in s.progress.to_dict()["by_source"].items()
            if v["copies"]}
    assert used == {"disk"}
    assert all(not s.uncovered for s in states if s.rank != victim)


def test_shadows_take_over_by_a_table_flip(tmp_path):
    cfg = _cfg("placement.redundant_slots_per_rank=0", "shadow.enabled=true")
    plan = ExpertPlan(8, 4, cfg, shadow_slots=2)
    assert plan.slots_per_rank == 4 and plan.shadow_slots == 2
    states = _states(plan, cfg)
    # while all live, shadows serve nothing
    assert all(s.status()["active_shadows"] == 0 for s in states)
    srv = _servers(states, set(range(4)))
    assert all(len(v) == 1 for v in srv.values())
    for s in states:
        s.set_dead({2})
    assert not states[0].moves  # covered by shadows: nothing to copy
    srv = _servers(states, {0, 1, 3})
    assert sorted(srv) == list(range(8)) and all(len(v) == 1 for v in srv.values())
    assert sum(s.status()["active_shadows"] for s in states if s.rank != 2) == 2


def test_degrade_does_not_wait(tmp_path):
    cfg = _cfg("placement.redundant_slots_per_rank=1", "recovery.on_uncovered=degrade")
    plan = ExpertPlan(8, 4, cfg)
    s = ExpertState(plan, 0, cfg)
    s.register(FakeExperts(plan, 0, "l"), plan.held_map(0).clone(), "l")
    s._pending[0] = 5
    t0 = time.monotonic()
    s.before_moe(s.layers[0].active, torch.tensor([[5, 1]]))
    s.after_moe()
    assert time.monotonic() - t0 < 0.5 and not s.counters.get("waits")


def test_process_state_is_one_per_model():
    experts.reset()
    try:
        a = experts.state_for(8, 2, 0, config=_cfg())
        assert experts.state_for(8, 2, 0, config=_cfg()) is a and experts.current() is a
        t = torch.zeros(8, dtype=torch.int32)
        a.register(FakeExperts(a.plan, 0, "l"), t, "l")
        experts.set_dead_ranks({1})
        assert a.membership.epoch == 1 and (t >= 0).all()  # the full mirror: all on rank 0
    finally:
        experts.reset()


def test_active_slots_prefers_regular_copies():
    from resilient_ep.layout import ExpertLayout

    lay = ExpertLayout.from_mapping([[0, 1, 1, 0]], num_ranks=2, num_experts=2)
    shadow = torch.tensor([False, True, False, True])
    a = active_slots(lay, torch.tensor([True, True]), shadow)
    assert a.tolist() == [[0, 2]]
    a = active_slots(lay, torch.tensor([False, True]), shadow)
    assert a.tolist() == [[3, 2]]  # expert 0's shadow on rank 1 takes over


def _active_slots_by_hand(lay, live_mask, shadow):
    """The rule in plain loops: per tier, the ``e mod n``-th live copy in slot order."""
    live = live_mask[lay.slot_ranks()]
    out = torch.full((lay.num_layers, lay.num_experts), -1, dtype=torch.int64)
    for layer in range(lay.num_layers):
        for tier in (False, True):
            copies = {}
            for slot, e in enumerate(lay.physical_to_logical[layer].tolist()):
                if e >= 0 and bool(live[slot]) and bool(shadow[slot]) == tier:
                    copies.setdefault(e, []).append(slot)
            for e, slots in copies.items():
                if out[layer, e] < 0:
                    out[layer, e] = slots[e % len(slots)]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_active_slots_equals_the_rule_on_random_layouts(seed):
    from resilient_ep.layout import ExpertLayout

    g = torch.Generator().manual_seed(seed)
    R = int(torch.randint(1, 6, (1,), generator=g))
    S = int(torch.randint(1, 5, (1,), generator=g))
    E = int(torch.randint(1, R * S + 1, (1,), generator=g))
    rows = torch.randint(-1, E, (3, R * S), generator=g)
    lay = ExpertLayout.from_mapping(rows, num_ranks=R, num_experts=E)
    live = torch.rand(R, generator=g) < 0.7
    shadow = torch.rand(R * S, generator=g) < 0.3
    assert torch.equal(active_slots(lay, live, shadow), _active_slots_by_hand(lay, live, shadow))


def test_a_repair_target_lost_mid_copy_is_replanned_onto_another_rank(tmp_path):
    """The copy's target dies before the copy lands: the next replan (every worker alike)
    treats what it was bringing back as lost again and picks a live target."""
    cfg = _cfg("placement.redundant_slots_per_rank=2")  # 6 ranks x 4 slots for 8 experts
    plan = ExpertPlan(8, 6, cfg)
    states = _states(plan, cfg)
    for s in states:
        s._ensure_thread = lambda: None  # no copy ever lands
    first = {r for r in range(6) if set(plan.layout.experts_on_rank(0, r))
             == set(plan.layout.experts_on_rank(0, 0))}  # every copy of rank 0's experts
    assert len(first) == 3
    for s in states:
        s.set_dead(first)
    moves1 = next(s for s in states if s.rank not in first).moves
    assert moves1 and all(m["rank"] not in first for m in moves1)
    target, lost = moves1[0]["rank"], moves1[0]["expert"]
    live = [s for s in states if s.rank not in first | {target}]
    for s in live:
        s.set_dead(first | {target})
    epoch = live[0].membership.epoch
    again = [m for m in live[0].moves if m["epoch"] == epoch]
    assert lost in {m["expert"] for m in again}
    assert all(m["rank"] not in first | {target} for m in again)
    assert all(s.moves == live[0].moves for s in live)  # every survivor plans alike
    assert live[0].status()["uncovered"] == []  # the survivors' slots hold every expert


def _replacement_of(plan, cfg, rank, backup=None, layers=("model.layers.0.mlp.experts",
                                                           "model.layers.1.mlp.experts")):
    """A fresh process for ``rank`` as vLLM's loader leaves it when the expert tensors were
    skipped: every slot garbage (NaN)."""
    s = ExpertState(plan, rank, cfg, backup=backup)
    for name in layers:
        m = FakeExperts(plan, rank, name)
        m.w13_weight.data.fill_(float("nan"))
        m.w2_weight.data.fill_(float("nan"))
        s.register(m, plan.held_map(rank).clone(), name)
    return s


@pytest.mark.parametrize("budget", ["placement.redundant_slots_per_rank=1", None])
def test_a_replacement_loads_its_experts_from_the_survivors_memory(tmp_path, monkeypatch, budget):
    """Rank 2 dies (its experts repaired or mirrored on the survivors), the survivors export
    what the replacement will hold, and the replacement fills every held slot from that
    export, bitwise, without the model files; then it verifies against them."""
    from resilient_ep.engines.vllm import replacement

    cfg = _cfg(*[b for b in [budget] if b])
    layers = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
    plan = ExpertPlan(8, 4, cfg)
    states = _states(plan, cfg, layers=layers)
    for s in states:
        s.after_load()
        s._ensure_thread = lambda: None
    for s in states:
        s.set_dead({2})
    for s in states:  # the repairs land (no source here: copy straight from the truth)
        for slot, e in list(s._pending.items()):
            local = slot - s.rank * plan.slots_per_rank
            for layer in s.layers:
                for n, p in slot_params_of(layer.module):
                    p.data[local] = weights(layer.name, e)[n]
            del s._pending[slot]
    root = tmp_path / "join"
    got = [s.export([2], str(root)) for s in states if s.rank != 2]
    exported = set().union(*(g["experts"] for g in got))
    assert exported == set(plan.layout.experts_on_rank(0, 2))
    assert sum(g["bytes"] for g in got) > 0

    monkeypatch.setenv(replacement.REJOIN_ENV, "2")
    monkeypatch.setenv(replacement.EXPERTS_ENV, str(root))
    new = _replacement_of(plan, cfg, 2, layers=layers)
    monkeypatch.setattr(experts, "_state", new)
    assert experts.skip_disk_experts()
    new.after_load()
    held = plan.held_map(2)
    for layer in new.layers:
        for e in plan.layout.experts_on_rank(0, 2):
            for n, p in slot_params_of(layer.module):
                assert torch.equal(p.data[held[e]], weights(layer.name, e)[n])
    assert dict(new.loaded_from) == {"peer": len(plan.layout.experts_on_rank(0, 2))}


def test_a_replacement_reads_the_model_files_when_an_expert_has_no_other_source(
        tmp_path, monkeypatch):
    """A peer died before it exported (its experts are in no export) and there is no host
    backup: the loader is left alone (every expert from the model files)."""
    from resilient_ep.engines.vllm import replacement

    cfg = _cfg()
    plan = ExpertPlan(8, 4, cfg)
    states = _states(plan, cfg)
    root = tmp_path / "join"
    partner = [s for s in states if s.rank != 1 and
               set(plan.layout.experts_on_rank(0, s.rank)) & set(plan.layout.experts_on_rank(0, 1))]
    for s in states:
        if s.rank not in (1, partner[0].rank):
            s.export([1], str(root))
    monkeypatch.setenv(replacement.REJOIN_ENV, "1")
    monkeypatch.setenv(replacement.EXPERTS_ENV, str(root))
    new = _replacement_of(plan, cfg, 1, layers=("model.layers.0.mlp.experts",))
    monkeypatch.setattr(experts, "_state", new)
    assert not experts.skip_disk_experts()
    # with a host backup (the survivors filled it at load) it reads none from disk
    backup = HostBackup(tmp_path / "experts")
    for s in states:
        s.backup = backup
        s.after_load()
    new.backup = backup
    assert experts.skip_disk_experts()
    new.after_load()
    assert dict(new.loaded_from) == {"host": len(plan.layout.experts_on_rank(0, 1))}
    assert new.verify()["mismatched"] == []


def test_outside_a_replacement_the_loader_reads_every_expert(monkeypatch):
    from resilient_ep.engines.vllm import replacement

    monkeypatch.delenv(replacement.REJOIN_ENV, raising=False)
    plan = ExpertPlan(8, 4, _cfg())
    monkeypatch.setattr(experts, "_state", _states(plan, _cfg())[0])
    assert not experts.skip_disk_experts()


def slot_params_of(module):
    from resilient_ep.engines.vllm.expert_weights import slot_params

    return list(slot_params(module))
