"""Where an instance's sockets live, on one host and on several; the multi-node config keys."""

import pytest

from resilient_ep.config import ConfigError, ResilienceConfig
from resilient_ep.transport.addressing import Addressing, check_host


def test_one_host_is_unix_sockets_in_the_run_dir():
    a = Addressing.ipc("/run/x", 4)
    assert a.rank_endpoint("data", 2) == "ipc:///run/x/data-2"
    assert a.frontend_endpoint("liveness") == "ipc:///run/x/liveness"
    assert a.num_nodes == 1 and a.node_of(3) == 0
    with pytest.raises(ValueError, match="between hosts only"):
        a.frontend_udp("liveness")


def test_several_hosts_ranks_node_major_ports_derived():
    a = Addressing.tcp(["10.0.0.1", "10.0.0.2"], 4, 20000)
    assert [a.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert a.ranks_of(1) == [2, 3]
    # channel c of rank r: base + c * R + r; the front end's after every rank channel
    assert a.rank_endpoints("data") == ["tcp://10.0.0.1:20000", "tcp://10.0.0.1:20001",
                                        "tcp://10.0.0.2:20002", "tcp://10.0.0.2:20003"]
    assert a.rank_endpoint("control", 3) == "tcp://10.0.0.2:20007"
    assert a.rank_endpoint("kvstore", 0) == "tcp://10.0.0.1:20008"
    assert a.frontend_endpoint("liveness") == "tcp://10.0.0.1:20012"
    assert a.frontend_udp("liveness") == ("10.0.0.1", 20012)
    assert a.span == 13
    ports = {int(a.rank_endpoint(c, r).rsplit(":", 1)[1]) for c in a.rank_channels for r in range(4)}
    assert len(ports) == 12 and 20012 not in ports, "no two sockets share a port"


@pytest.mark.parametrize("kw, fragment", [
    pytest.param(dict(hosts=["a", "b"], num_ranks=3, base_port=20000), "multiple of the nodes",
                 id="ranks_not_a_multiple"),
    pytest.param(dict(hosts=["a"], num_ranks=4, base_port=65530), "1024..65535", id="range_past_65535"),
    pytest.param(dict(hosts=["a"], num_ranks=4, base_port=80), "1024..65535", id="privileged_port"),
])
def test_impossible_layouts_are_refused(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        Addressing.tcp(kw["hosts"], kw["num_ranks"], kw["base_port"])
    with pytest.raises(ValueError, match="unknown channel 'x'"):
        Addressing.tcp(["a"], 2, 20000).rank_endpoint("x", 0)


@pytest.mark.parametrize("host, ok", [("10.1.2.3", True), ("node-a.cluster", True), ("gpu7", True),
                                      ("::1", False), ("0.0.0.0", False), ("224.0.0.1", False),
                                      ("a b", False), ("", False), ("-x", False)])
def test_node_addresses(host, ok):
    assert (check_host(host) is None) is ok


MULTI = ["transport.address=tcp", "transport.node_addresses=[10.0.0.1, 10.0.0.2]",
         "transport.base_port=21000"]


@pytest.mark.parametrize("overrides, field, fragment", [
    pytest.param(MULTI[1:], "transport.address", "must be 'tcp'", id="ipc_between_hosts"),
    pytest.param([MULTI[0], MULTI[1]], "transport.base_port", "must be set", id="no_base_port"),
    pytest.param([*MULTI, "transport.node_addresses=[10.0.0.1, 10.0.0.1]"], "transport.node_addresses",
                 "twice", id="duplicate_node"),
    pytest.param([*MULTI, "transport.node_addresses=['10.0.0.1', 'fe80::1']"],
                 "transport.node_addresses[1]", "IPv6", id="ipv6"),
    pytest.param(["transport.base_port=99999"], "transport.base_port", "1024..65535", id="bad_port"),
    pytest.param(["detector.lease_ms=200"], "detector.lease_ms", "<= heartbeat_timeout_ms",
                 id="lease_past_the_timeout"),
    pytest.param(["detector.lease_ms=40"], "detector.lease_ms", "> heartbeat_interval_ms",
                 id="lease_below_the_interval"),
])
def test_bad_multinode_config_names_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as e:
        ResilienceConfig().with_overrides(overrides)
    assert e.value.field == field and fragment in str(e.value)


def test_lease_defaults_to_the_heartbeat_timeout():
    cfg = ResilienceConfig().with_overrides([*MULTI, "detector.heartbeat_timeout_ms=400"])
    assert cfg.detector.lease_s == 0.4
    assert cfg.with_overrides(["detector.lease_ms=300"]).detector.lease_s == 0.3
    assert cfg.transport.node_addresses == ("10.0.0.1", "10.0.0.2")


def test_the_reference_runtime_refuses_what_one_host_only_can_hold(tmp_path):
    from resilient_ep.runtime.hosts import RankHosts

    cfg = ResilienceConfig().with_overrides(MULTI)
    h = RankHosts(cfg, 4, tmp_path, launcher=lambda n: ["ip", "netns", "exec", f"n{n}"])
    assert h.prefix(3) == ["ip", "netns", "exec", "n1"] and h.kv_nodes() == [0, 0, 1, 1]
    assert h.rank_liveness(2) == {"udp": ["10.0.0.1", 21012], "bind_host": "10.0.0.2",
                                  "lease_s": 0.15}
    for extra, fragment in ((["kv_checkpoint.store=shm"], "kv_checkpoint.store"),
                            (["repair.host_backup=true"], "repair.host_backup"),
                            (["transport.authenticate=false"], "transport.authenticate"),
                            (["placement.ranks_per_node=4"], "placement.ranks_per_node")):
        with pytest.raises(ValueError, match=fragment):
            RankHosts(cfg.with_overrides(extra), 4, tmp_path)
    with pytest.raises(ValueError, match="needs transport.node_addresses"):
        RankHosts(ResilienceConfig(), 4, tmp_path, launcher=lambda n: [])
