"""Each ledger patch: signature check, idempotence, loud failure, and what it fixes."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import socket

import pytest
import torch

from resilient_ep.engines.vllm import patches
from resilient_ep.engines.vllm.patches import PatchError

pytestmark = pytest.mark.engine

MODULES = [
    "resilient_ep.engines.vllm.patches.cpu_moe_expert_map",
    "resilient_ep.engines.vllm.patches.cpu_communicator_gatherv",
    *patches.FAILOVER_PATCHES,
]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.rsplit(".", 1)[1])
def test_check_apply_idempotent(path):
    mod = importlib.import_module(path)
    mod.check()
    mod.apply()
    assert mod.is_applied()
    first = {k: v for k, v in vars(_target_cls(mod)).items() if callable(v)}
    mod.apply()  # second time: no-op
    mod.check()  # still passes on a patched class
    again = {k: v for k, v in vars(_target_cls(mod)).items() if callable(v)}
    assert first == again
    assert (os.path.exists(_ledger(mod.NAME))), f"ledger entry for {mod.NAME} missing"


def _target_cls(mod):
    """The namespace a patch rewrites (class or module)."""
    for name in ("_target", "_module"):
        if hasattr(mod, name):
            return getattr(mod, name)()
    if hasattr(mod, "_targets"):
        return mod._targets()[0]
    return mod._classes()[1]


def _ledger(name: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return os.path.join(root, "patches", f"{name}.md")


def test_apply_when_imported_runs_after_the_first_import(tmp_path, monkeypatch):
    from resilient_ep.engines.vllm.patches import _when_imported

    (tmp_path / "rep_fake_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    _when_imported("rep_fake_target", lambda: seen.append(
        __import__("sys").modules["rep_fake_target"].VALUE))
    assert seen == []
    import rep_fake_target  # noqa: F401

    assert seen == [1]
    _when_imported("rep_fake_target", lambda: seen.append(2))  # already loaded: at once
    assert seen == [1, 2]


def test_signature_mismatch_fails_loudly():
    def apply(self, output, hidden_states):  # an upstream that changed its signature
        pass

    with pytest.raises(PatchError, match="vllm-cpu-moe-expert-map"):
        patches.expect_signature("vllm-cpu-moe-expert-map", apply,
                                 ("self", "output", "hidden_states", "topk_ids"))


def test_unsupported_version_fails_loudly(monkeypatch):
    monkeypatch.setattr(patches, "vllm_version", lambda: "0.99.0")
    with pytest.raises(PatchError, match="0.99.0"):
        importlib.import_module(MODULES[0]).check()


def test_upstream_fix_makes_gatherv_patch_fail_loudly(monkeypatch):
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    mod = importlib.import_module(MODULES[1])
    monkeypatch.setattr(CpuCommunicator, "all_gatherv", lambda self, x, dim=0, sizes=None: x,
                        raising=False)
    with pytest.raises(PatchError, match="now exists upstream"):
        mod.check()


# ------------------------------------------------------------ vllm-cpu-moe-expert-map
def test_localize_topk_worked_example():
    from resilient_ep.engines.vllm.patches.cpu_moe_expert_map import localize_topk

    expert_map = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)  # rank 1 of 2 holds 2, 3
    ids = torch.tensor([[0, 2], [3, 1]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    w2, ids2 = localize_topk(w, ids, expert_map)
    assert ids2.tolist() == [[0, 0], [1, 0]] and ids2.dtype == ids.dtype
    assert torch.allclose(w2, torch.tensor([[0.0, 0.4], [0.7, 0.0]]))


class _FakeExperts:
    """Enough of ``CPUUnquantizedExperts`` for ``apply`` on the real kernel."""

    isa = "vec"
    w1_bias = None
    w2_bias = None
    _use_zentorch = False


def _moe(apply, x, w13, w2, topk_w, topk_ids, expert_map):
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    out = torch.zeros_like(x)
    apply(_FakeExperts(), out, x, cpu_prepack_moe_weight(w13, "vec"),
          cpu_prepack_moe_weight(w2, "vec"), topk_w, topk_ids, MoEActivation.SILU,
          w13.shape[0], expert_map, None, None, None, None, None, False)
    return out


def test_expert_parallel_sum_equals_all_local():
    """Two EP 'ranks' with the patched apply sum to the unsharded result (fp32)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    mod = importlib.import_module(MODULES[0])
    mod.apply()
    patched = CPUUnquantizedExperts.apply
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 7, 64, 64, 8, 2
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    logits = torch.randn(T, E, generator=g)
    topk_w, topk_ids = torch.softmax(logits, -1).topk(k, dim=-1)
    topk_ids = topk_ids.to(torch.int32)
    full = _moe(patched, x, w13, w2, topk_w, topk_ids, None)
    total = torch.zeros_like(full)
    for rank in range(2):
        local = list(range(rank * 4, rank * 4 + 4))
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(4, dtype=torch.int32)
        total += _moe(patched, x, w13[local].contiguous(), w2[local].contiguous(), topk_w,
                      topk_ids, expert_map)
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- vllm-cpu-communicator-gatherv
class _Comm:
    """What the patched ``CpuCommunicator`` methods read (no vLLM import: the spawned
    workers start in a second instead of ~15 s)."""

    from resilient_ep.engines.vllm.patches.cpu_communicator_gatherv import (
        all_gatherv,
        reduce_scatterv,
    )

    def __init__(self, rank, world, group):
        self.rank_in_group, self.world_size, self.device_group = rank, world, group


def _gloo_worker(rank, world, port, q):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        comm = _Comm(rank, world, dist.group.WORLD)
        sizes = [3, 1, 0][:world]
        x = torch.full((sizes[rank], 2), float(rank + 1))
        ids = torch.full((sizes[rank], 1), rank, dtype=torch.int32)
        gathered, gathered_ids = comm.all_gatherv([x, ids], dim=0, sizes=sizes)
        single = comm.all_gatherv(x, dim=0, sizes=sizes)
        full = torch.arange(sum(sizes) * 2, dtype=torch.float32).reshape(-1, 2) * (rank + 1)
        scattered = comm.reduce_scatterv(full, dim=0, sizes=sizes)
        q.put((rank, gathered.tolist(), gathered_ids.tolist(), single.tolist(),
               scattered.tolist()))
    finally:
        dist.destroy_process_group()


def test_patched_methods_are_the_tested_ones():
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    from resilient_ep.engines.vllm.patches import cpu_communicator_gatherv as mod

    mod.apply()
    assert CpuCommunicator.all_gatherv is mod.all_gatherv is _Comm.all_gatherv
    assert CpuCommunicator.reduce_scatterv is mod.reduce_scatterv is _Comm.reduce_scatterv


def test_gatherv_and_scatterv_over_gloo():
    world = 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = sorted(q.get(timeout=120) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    sizes = [3, 1, 0]
    want_x = [[1.0, 1.0]] * 3 + [[2.0, 2.0]]
    full = torch.arange(4 * 2, dtype=torch.float32).reshape(-1, 2) * (1 + 2 + 3)
    for rank, gathered, gathered_ids, single, scattered in results:
        assert gathered == want_x and single == want_x
        assert gathered_ids == [[0]] * 3 + [[1]]
        start = sum(sizes[:rank])
        assert scattered == full[start:start + sizes[rank]].tolist()


def test_readmission_request_continues_after_generated_tokens():
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    from resilient_ep.engines.vllm.frontend import readmission_request

    sp = SamplingParams(max_tokens=10, min_tokens=4, temperature=0)
    req = EngineCoreRequest(request_id="r1", prompt_token_ids=[5, 6, 7], mm_features=None,
                            sampling_params=sp, pooling_params=None, arrival_time=1.0,
                            lora_request=None, cache_salt=None, data_parallel_rank=1)
    new = readmission_request(req, [11, 12, 13])
    assert new.request_id == "r1" and new.arrival_time == 1.0
    assert new.prompt_token_ids == [5, 6, 7, 11, 12, 13]
    assert new.sampling_params.max_tokens == 7 and new.sampling_params.min_tokens == 1
    assert new.data_parallel_rank is None  # pinned to a dead rank: let the balancer choose
    # the original is untouched (a second failure re-admits from the new one)
    assert req.prompt_token_ids == [5, 6, 7] and req.sampling_params.max_tokens == 10


def test_expert_maps_come_from_the_cores_placement(monkeypatch):
    from resilient_ep.config import ResilienceConfig
    from resilient_ep.engines.vllm import experts
    from resilient_ep.engines.vllm.patches import expert_replicas

    expert_replicas.apply()
    emm, _ = expert_replicas._targets()
    cfg = ResilienceConfig().with_overrides(["placement.redundant_slots_per_rank=1"])
    monkeypatch.setattr(expert_replicas, "_wanted", lambda: True)
    monkeypatch.setattr(expert_replicas, "_state",
                        lambda e, n, r: experts.state_for(e, n, r, config=cfg))
    try:
        for E, N, rank in ((8, 4, 1), (7, 2, 1), (10, 4, 3)):  # any expert count
            n, held, _ = emm.determine_expert_map(N, rank, E)
            plan = experts.current().plan
            assert n == plan.slots_per_rank == -(-E // N) + 1
            assert held.tolist() == plan.held_map(rank).tolist()
            assert sorted(held[held >= 0].tolist()) == list(range(n))
        # not ours (round robin): vLLM's own map
        n, held, _ = emm.determine_expert_map(2, 1, 8, "round_robin")
        assert n == 4 and held.tolist() == [-1, 0, -1, 1, -1, 2, -1, 3]
    finally:
        experts.reset()


def test_subclass_overrides_are_signature_checked():
    from resilient_ep.engines.vllm.patches import expect_overrides

    class Base:
        def step(self, batch):
            pass

    expect_overrides("vllm-x", Base, {"step": ("self", "batch")})
    with pytest.raises(PatchError, match="takes"):
        expect_overrides("vllm-x", Base, {"step": ("self", "batch", "extra")})
    with pytest.raises(PatchError, match="is gone"):
        expect_overrides("vllm-x", Base, {"finish": ("self",)})


def test_a_replacement_skips_expert_tensors_before_they_are_read(monkeypatch):
    """``vllm-expert-replicas`` on the loader: when the experts module says every held expert
    has a peer or host source, vLLM's EP weight filter skips every expert tensor (dense ones
    are read); otherwise the loader is untouched."""
    from types import SimpleNamespace

    from vllm.config import LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight

    from resilient_ep.engines.vllm import experts
    from resilient_ep.engines.vllm.patches import expert_replicas

    expert_replicas.check()
    expert_replicas.apply()
    loader = DefaultModelLoader(LoadConfig())
    not_moe = SimpleNamespace(is_moe=False)
    with set_current_vllm_config(VllmConfig()):
        monkeypatch.setattr(experts, "skip_disk_experts", lambda: False)
        loader._init_ep_weight_filter(not_moe)
        assert loader.local_expert_ids is None
        monkeypatch.setattr(experts, "skip_disk_experts", lambda: True)
        loader._init_ep_weight_filter(not_moe)
        assert loader.local_expert_ids == set()
    ids = loader.local_expert_ids
    assert should_skip_weight("model.layers.0.mlp.experts.3.gate_proj.weight", ids)
    assert not should_skip_weight("model.layers.0.self_attn.q_proj.weight", ids)
    assert not should_skip_weight("model.layers.0.mlp.gate.weight", ids)
