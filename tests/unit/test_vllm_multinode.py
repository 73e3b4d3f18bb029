"""vLLM across nodes (engines/vllm/multinode.py) without vLLM: one instance id on every
node, TCP endpoints at each rank's node, the key only the head makes, the refusals, the
launcher's node environment; and the core pieces it uses (remote ranks in the tracker)."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import pytest

from resilient_ep.config import ConfigError, ResilienceConfig
from resilient_ep.engines.vllm import instance as inst
from resilient_ep.engines.vllm import multinode
from resilient_ep.transport import wire

NODES = ["transport.address=tcp", "transport.node_addresses=[10.9.0.1, 10.9.0.2]",
         "transport.base_port=26000"]


def _pc(dp=4, local=2, rank=0):
    return SimpleNamespace(data_parallel_size=dp, data_parallel_size_local=local,
                           data_parallel_rank=rank)


def _args(**kw):
    base = dict(data_parallel_backend="mp", data_parallel_size=4, data_parallel_size_local=2,
                data_parallel_address="10.9.0.1", data_parallel_rpc_port=13345,
                tensor_parallel_size=1)
    return SimpleNamespace(**{**base, **kw})


def test_every_node_names_the_same_instance():
    cfg = ResilienceConfig().with_overrides(NODES)
    head = multinode.instance_id(cfg, _args())
    other = multinode.instance_id(cfg, _args(data_parallel_start_rank=2))
    assert head == other and head.startswith("mn")
    assert multinode.instance_id(cfg, _args(data_parallel_rpc_port=1)) != head
    assert multinode.instance_id(ResilienceConfig(), _args()) is None  # one host: a fresh id


def test_sockets_are_tcp_at_each_ranks_node():
    cfg = ResilienceConfig().with_overrides(NODES)
    head = multinode.nodes_of(cfg, _pc(rank=0))
    other = multinode.nodes_of(cfg, _pc(rank=2))
    assert head.head and not other.head and other.local_ranks == (2, 3)
    core = head.endpoints("core", 4)
    assert core == other.endpoints("core", 4)
    assert [e.split(":")[1] for e in core] == ["//10.9.0.1", "//10.9.0.1", "//10.9.0.2",
                                               "//10.9.0.2"]
    ports = {int(e.rsplit(":", 1)[1]) for k in multinode.RANK_CHANNELS
             for e in head.endpoints(k, 4)}
    assert len(ports) == 4 * len(multinode.RANK_CHANNELS)
    assert head.endpoints("membership", 1)[0].startswith("tcp://10.9.0.1:")
    assert head.beacon_udp()[0] == "10.9.0.1"
    with pytest.raises(ValueError, match="rejoin"):
        head.endpoints("w0e3", 4)  # a rejoin's incarnation: one host only
    with pytest.raises(ConfigError, match="one address per node"):
        multinode.nodes_of(cfg, _pc(dp=6, local=2))


@pytest.mark.parametrize("kw, cfg, fragment", [
    pytest.param(dict(data_parallel_backend="ray"), NODES, "--data-parallel-backend ray",
                 id="ray"),
    pytest.param(dict(data_parallel_backend="ray", data_parallel_size_local=None), [],
                 "--data-parallel-backend ray", id="ray_one_node"),
    pytest.param({}, [], "needs the nodes' addresses", id="no_addresses"),
    pytest.param({}, [*NODES, "recovery.respawn=true"], "recovery.respawn", id="respawn"),
    pytest.param(dict(data_parallel_address="10.9.0.2"), NODES, "must start with the head",
                 id="head_not_first"),
])
def test_what_resilience_does_not_cover_is_refused(kw, cfg, fragment):
    with pytest.raises((ValueError, ConfigError), match=fragment.replace("-", r"\-")):
        multinode.check_topology(_args(**kw), ResilienceConfig().with_overrides(cfg),
                                 headless=False)


def test_one_node_passes():
    multinode.check_topology(_args(data_parallel_size_local=None), ResilienceConfig(),
                             headless=False)


def test_only_the_head_makes_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    key = tmp_path / "shared.key"
    cfg = ResilienceConfig().with_overrides([*NODES, f"transport.key_file={key}"])
    extra = lambda: {"resilience": {**cfg.to_dict(), "instance": "mnx"}}  # noqa: E731
    try:
        other = SimpleNamespace(additional_config=extra(), parallel_config=_pc(rank=2))
        multinode._registered.clear()
        inst.instance_of(other)
        with pytest.raises(FileNotFoundError, match="copy it from the head"):
            inst.join_instance("mnx")
        multinode._registered.clear()
        head = SimpleNamespace(additional_config=extra(), parallel_config=_pc(rank=0))
        inst.instance_of(head)
        inst.join_instance("mnx")
        assert wire.load_key(key) == wire.process_key()
        assert inst.endpoints("mnx", "w0", 4)[3].startswith("tcp://10.9.0.2:")
    finally:
        multinode._registered.clear()
        inst._keyed.discard("mnx")
        wire.set_key(None)


def test_the_launcher_finds_this_nodes_address(monkeypatch):
    env = {}
    monkeypatch.setattr(multinode, "local_address_towards", lambda host: "10.9.0.2")
    monkeypatch.setattr(multinode, "interface_of", lambda addr: "eth7")
    assert multinode.node_environment(["--data-parallel-address", "10.9.0.1"], env) == {
        "VLLM_HOST_IP": "10.9.0.2", "GLOO_SOCKET_IFNAME": "eth7"}
    env = {"VLLM_HOST_IP": "10.9.0.5"}
    assert multinode.node_environment(["--data-parallel-address=10.9.0.1"], env) == {
        "GLOO_SOCKET_IFNAME": "eth7"}
    assert multinode.node_environment(["--data-parallel-address", "127.0.0.1"], {}) == {}
    assert multinode.node_environment([], {}) == {}


def test_a_remote_ranks_loss_is_recorded_at_its_fence():
    from resilient_ep.liveness.tracker import LivenessTracker
    from resilient_ep.membership import Membership, RankState

    fenced = []
    t = LivenessTracker(Membership(4), [0, 1], fence=lambda r, why: fenced.append(r),
                        remote=[2, 3])
    assert t.ranks == frozenset(range(4))
    assert [x.rank for x in t.fence(1, "hang", "x")] == [] and fenced == [1]  # local: at exit
    assert [x.rank for x in t.fence(3, "hang", "x")] == [3] and fenced == [1]  # remote: now
    assert t.membership.state(3) is RankState.FENCED


def test_an_engine_without_its_lease_holds_until_it_has_one_again():
    import threading
    import time

    class Beacon:
        granted, lease_s, interval_s = 0, 0.15, 0.01
        ok = False

        def holds_lease(self):
            return self.ok

    b = Beacon()
    assert multinode.hold_without_lease(b, 1) == 0.0  # never granted yet (starting): go on
    b.granted, b.ok = 3, True
    assert multinode.hold_without_lease(b, 1) == 0.0
    b.ok = False
    threading.Timer(0.1, setattr, args=(b, "ok", True)).start()
    t0 = time.monotonic()
    assert multinode.hold_without_lease(b, 1) > 0.0 and time.monotonic() - t0 >= 0.09


def test_expert_replicas_are_placed_on_different_nodes():
    """With a budget below the full mirror, the replicas of an expert sit on ranks of
    different nodes (placement knows the nodes): a lost node leaves a copy of each."""
    from resilient_ep.engines.vllm.experts import ExpertPlan

    cfg = ResilienceConfig().with_overrides([*NODES, "placement.redundant_slots_per_rank=1"])
    plan = ExpertPlan(8, 4, cfg)  # EP ranks 0, 1 on node 0; 2, 3 on node 1
    for node_lost in ({0, 1}, {2, 3}):
        held = {e for r in range(4) if r not in node_lost for e in plan.layout.experts_on_rank(0, r)}
        pairs = [(e, [r for r in range(4) if e in plan.layout.experts_on_rank(0, r)])
                 for e in range(8)]
        doubled = [e for e, rs in pairs if len(rs) == 2]
        assert doubled and all({r // 2 for r in rs} == {0, 1} for e, rs in pairs if e in doubled)
        assert set(doubled) <= held
