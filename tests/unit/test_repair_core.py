"""The core's budget arithmetic, shadow planning, repair sources and host backup (pure, fast)."""

import torch
import pytest

from resilient_ep.config import ResilienceConfig
from resilient_ep.layout import ExpertLayout
from resilient_ep.membership import Membership
from resilient_ep.placement import place, replan, survival_probability
from resilient_ep.placement.budget import (base_slots, mirror_redundancy, redundancy_from_total,
                                           repairable_deaths)
from resilient_ep.recovery import RecoveryOrchestrator
from resilient_ep.repair import HostBackup, candidates
from resilient_ep.shadow import plan_shadows, shadow_slots_for_memory


def test_budget_arithmetic():
    assert base_slots(8, 4) == 2 and base_slots(7, 2) == 4
    assert mirror_redundancy(8, 4) == 2 and mirror_redundancy(8, 1) == 0
    assert redundancy_from_total(6, 4) == 2 and redundancy_from_total(0, 4) == 0
    assert repairable_deaths(8, 4, 3) == 1 and repairable_deaths(8, 4, 4) == 2
    assert repairable_deaths(8, 4, 2) == 0
    with pytest.raises(ValueError):
        redundancy_from_total(-1, 4)


def test_shadows_go_to_exposed_experts_on_other_ranks_and_buy_survival():
    regular = place(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=2)
    assert survival_probability(regular, 1).p == 0.0  # every expert on one rank
    sh = plan_shadows(regular, 2)
    lay = sh.layout
    assert lay.slots_per_rank == 4 and sh.shadow_mask().sum() == 8
    for r in range(4):
        held = lay.experts_on_rank(0, r)
        assert len(set(held)) == len(held)  # never a second copy on one rank
    assert lay.replica_count[0].tolist() == [2] * 8  # the single-copy experts first
    assert survival_probability(lay, 1).p == 1.0
    hot = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 1]])
    one = plan_shadows(regular, 1, load=hot).layout
    assert one.replica_count[0, 0] == 2  # load breaks the tie: the hot expert first


def test_shadow_slots_for_memory():
    assert shadow_slots_for_memory(10e9, 0.1, 10**8) == 10
    assert shadow_slots_for_memory(10e9, 0.1, 10**8, max_slots=3) == 3
    assert shadow_slots_for_memory(10e9, 0.1, 10**8, free_experts=2) == 2
    assert shadow_slots_for_memory(0, 0.5, 1) == 0


def test_shadows_route_only_for_an_expert_that_lost_its_regular_copies():
    regular = place(num_layers=1, num_experts=8, num_ranks=4, slots_per_rank=2)
    sh = plan_shadows(regular, 2)
    orch = RecoveryOrchestrator(Membership(4), sh.layout, ResilienceConfig(),
                                shadow_mask=sh.shadow_mask())
    routed = orch.layout.physical_to_logical[0]
    assert (routed[sh.shadow_mask()] == -1).all()  # all live: shadows take nothing
    plan = orch.on_failure([1], "crash", {})
    assert plan.replan.moves == [] and plan.uncovered == []
    routed = plan.layout.physical_to_logical[0]
    lost = set(regular.experts_on_rank(0, 1))
    served_by_shadow = {int(e) for e in routed[sh.shadow_mask()].tolist() if e >= 0}
    assert served_by_shadow == lost


def test_replan_spreads_copies_over_the_survivors():
    lay = ExpertLayout.from_mapping([[0, 2, 4, 6, 1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7]],
                                    num_ranks=4, num_experts=8)
    res = replan(lay, [0, 2])
    assert sorted(m.expert for m in res.moves) == [0, 2, 4, 6]
    by_rank = {}
    for m in res.moves:
        by_rank[m.slot // 4] = by_rank.get(m.slot // 4, 0) + 1
    assert by_rank == {1: 2, 3: 2}
    assert res.repaired_layout.replica_count[0].min() == 1


def test_repair_candidates_in_cost_order(tmp_path):
    lay = ExpertLayout.from_mapping([[0, 1, 1, 2, 2, 0]], num_ranks=3, num_experts=3)
    order = ("shadow", "peer", "host", "remote", "disk")
    c = candidates(lay, 0, 1, 1, live_ranks=[0, 1, 2], sources=order,
                   host_has=lambda l, e: True)
    assert [(x.kind, x.rank) for x in c] == [("shadow", 1), ("peer", 0), ("host", None),
                                             ("disk", None)]
    c = candidates(lay, 0, 1, 2, live_ranks=[1, 2], sources=order, exclude_slots=[2])
    assert [x.kind for x in c] == ["disk"]  # the only live copy is being overwritten
    c = candidates(lay, 0, 0, 1, live_ranks=[0, 1, 2], sources=("disk", "peer"))
    assert [x.kind for x in c] == ["disk", "peer", "peer"]  # the configured order wins
    c = candidates(ExpertLayout.from_mapping([[0, 1, 0, 1, 0, 1, 0, 1]], num_ranks=4,
                                             num_experts=2),
                   0, 0, 3, live_ranks=[0, 1, 2], sources=("peer",), ranks_per_node=2)
    assert [x.rank for x in c] == [2, 0, 1]  # same node first


def test_host_backup_first_writer_wins_and_files_are_whole(tmp_path):
    b = HostBackup(tmp_path / "experts")
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    assert b.put("model.layers.0/mlp", 3, t) is True
    assert b.put("model.layers.0/mlp", 3, {"w": torch.zeros(2, 3)}) is False
    assert b.has("model.layers.0/mlp", 3) and not b.has("model.layers.0/mlp", 4)
    assert torch.equal(b.get("model.layers.0/mlp", 3)["w"], t["w"])
    assert b.get("model.layers.0/mlp", 4) is None
    assert b.experts() == {"model.layers.0_mlp": [3]} and b.nbytes() > 0
    assert not list(b.root.rglob("*.tmp"))
    b.remove()
    assert not b.root.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.uint8, torch.bool])
def test_host_backup_maps_what_it_stored_exactly(tmp_path, dtype):
    """``get`` reads the file itself (a private memory mapping): every dtype and shape the
    engines store comes back bitwise, an empty tensor too; writing to what it returns never
    changes the stored file."""
    b = HostBackup(tmp_path / "experts")
    g = torch.Generator().manual_seed(1)
    t = {"w13": (torch.randn(4, 5, generator=g) * 50).to(dtype),
         "w2": (torch.randn(3, generator=g) * 50).to(dtype),
         "empty": torch.zeros(0, 2, dtype=dtype)}
    b.put("layers.1.experts", 2, t)
    got = b.get("layers.1.experts", 2)
    assert set(got) == set(t)
    for k in t:
        assert got[k].dtype == t[k].dtype and got[k].shape == t[k].shape
        assert torch.equal(got[k], t[k])
    got["w13"].zero_()
    again = b.get("layers.1.experts", 2)
    assert torch.equal(again["w13"], t["w13"])
    b.remove()
    assert torch.equal(again["w2"], t["w2"]), "a mapping outlives the file's removal"


def test_host_backup_refuses_a_damaged_file(tmp_path):
    from resilient_ep.repair.host_backup import map_safetensors

    b = HostBackup(tmp_path / "experts")
    b.put("l", 0, {"w": torch.ones(8)})
    path = next(b.root.rglob("0.safetensors"))
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # tensor data cut short
    with pytest.raises(ValueError, match="outside the file"):
        map_safetensors(path)
    path.write_bytes(b"\xff" * 8 + data[8:])  # header length beyond the file
    with pytest.raises(ValueError, match="header"):
        map_safetensors(path)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="no safetensors"):
        map_safetensors(path)


def test_copy_weights_on_host_is_a_plain_copy():
    from resilient_ep.repair.staging import copy_weights

    dst = torch.zeros(3, 4)
    src = torch.arange(12.0).reshape(4, 3).t()  # not contiguous
    copy_weights(dst, src)
    assert torch.equal(dst, src)
