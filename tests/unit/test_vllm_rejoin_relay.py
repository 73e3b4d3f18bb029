"""Rejoin with several API servers, without vLLM (``engines/vllm/rejoin_relay.py``): the
launcher calls the engines through an API server's relay, and the API servers hand it their
rejoin requests. Real sockets of a real instance directory; fake engine clients."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
import uuid

import pytest
import zmq

from resilient_ep.engines.vllm import rejoin_relay as relay
from resilient_ep.engines.vllm.rejoin import EngineLost, RejoinError
from resilient_ep.transport import curve, wire


@pytest.fixture
def instance(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield uuid.uuid4().hex[:12]
    wire.set_key(None)


class FakeClient:
    """What the relay reads of vLLM's engine client: engines, the loop, utility calls."""

    def __init__(self, engines: int = 2):
        self.core_engines = [f"engine{i}".encode() for i in range(engines)]
        self.calls: list = []
        self.hang = asyncio.Event()
        self._re_loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._re_loop.run_forever, daemon=True)
        self._thread.start()

    async def _call_utility_async(self, method, *args, engine):
        self.calls.append((method, args, engine))
        if method == "resilient_ep_hang":
            await asyncio.sleep(3600)
        if method == "resilient_ep_boom":
            raise RuntimeError("the worker raised")
        return {"method": method, "args": list(args), "engine": engine.decode(),
                "fingerprints": [[0.5, -1.25]] * 3, "by_int": {3: "x"}}

    def close(self):
        self._re_loop.call_soon_threadsafe(self._re_loop.stop)
        self._thread.join(5)


@pytest.fixture
def api_servers(instance):
    clients = [FakeClient(), FakeClient()]
    relays = [relay.EngineCallRelay(c, instance, i).start() for i, c in enumerate(clients)]
    _wait_for(lambda: len(relay.relay_endpoints(instance)) == 2)
    yield clients, relays
    for r in relays:
        r.stop()
    for c in clients:
        c.close()


def _wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_engine_call_goes_through_the_first_relay_and_comes_back(instance, api_servers):
    clients, _ = api_servers
    got = relay.call_engine(instance, 1, "collective_rpc",
                            ("resilient_ep_probe", 60.0, (["layer0", 3],), None), 10.0)
    assert got["engine"] == "engine1" and got["method"] == "collective_rpc"
    assert got["args"] == ["resilient_ep_probe", 60.0, [["layer0", 3]], None]
    assert got["fingerprints"] == [[0.5, -1.25]] * 3 and got["by_int"] == {3: "x"}
    assert len(clients[0].calls) == 1 and clients[1].calls == []


def test_a_dead_relay_is_skipped_and_errors_come_back(instance, api_servers):
    clients, relays = api_servers
    relays[0].stop()  # its socket file stays behind, as after a crash
    assert len(relay.relay_endpoints(instance)) == 2
    assert relay.call_engine(instance, 0, "resilient_ep_counters", (), 10.0)["engine"] == \
        "engine0"
    assert len(clients[1].calls) == 1
    with pytest.raises(RuntimeError, match="the worker raised"):
        relay.call_engine(instance, 0, "resilient_ep_boom", (), 10.0)


def test_a_call_to_a_lost_engine_is_given_up_at_once(instance, api_servers):
    lost = threading.Event()
    threading.Timer(0.3, lost.set).start()
    t0 = time.monotonic()
    with pytest.raises(EngineLost):
        relay.call_engine(instance, 1, "resilient_ep_hang", (), 60.0, lost=lost.is_set)
    assert time.monotonic() - t0 < 30
    with pytest.raises(TimeoutError):
        relay.call_engine(instance, 1, "resilient_ep_hang", (), 0.5)


def test_no_relay_is_a_clear_error(instance):
    with pytest.raises(RuntimeError, match="no API server relays engine calls"):
        relay.call_engine(instance, 0, "x", (), 1.0)


def test_forged_and_malformed_messages_are_dropped_and_counted(instance, api_servers):
    clients, relays = api_servers
    ctx = zmq.Context.instance()
    sock = curve.client(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(relay.relay_endpoint(instance, 0))
    sock.send_multipart([b"garbage"], flags=zmq.NOBLOCK)
    sock.send_multipart(wire.encode({"t": "call", "id": 1, "engine": 9, "utility": "x",
                                     "args": [], "timeout_s": 1.0}), flags=zmq.NOBLOCK)
    sock.send_multipart(wire.encode({"t": "call", "id": 2}), flags=zmq.NOBLOCK)
    # vLLM's own utilities and worker methods are not a rejoin's: refused
    for utility, args in (("collective_rpc", ["load_model", 5.0, [], None]),
                          ("reset_prefix_cache", []), ("collective_rpc", [])):
        sock.send_multipart(wire.encode({"t": "call", "id": 3, "engine": 0, "utility": utility,
                                         "args": args, "timeout_s": 1.0}), flags=zmq.NOBLOCK)
    _wait_for(lambda: sum(relays[0].dropped.values()) == 6)
    sock.close(linger=0)
    assert relays[0].dropped == {"magic": 1, "fields": 5}
    assert clients[0].calls == []  # nothing reached an engine
    assert relay.call_engine(instance, 0, "resilient_ep_ok", (), 10.0)["engine"] == "engine0"


class FakeRejoiner:
    def __init__(self):
        self.records = []

    def request(self, rank, reason="api"):
        if rank == 0:
            raise RejoinError("rank 0 is live: nothing to rejoin")
        rec = {"rank": rank, "state": "queued", "reason": reason}
        self.records.append(rec)
        return dict(rec)

    def status(self):
        return [dict(r) for r in self.records]


def test_api_servers_hand_their_rejoins_to_the_launcher(instance):
    rejoiner = FakeRejoiner()
    host = type("Host", (), {"joins": [{"dp_rank": 1, "epoch": 2}]})()
    service = relay.RejoinService(rejoiner, host, instance).start()
    try:
        remote = relay.RemoteRejoiner(instance)
        assert remote.request(1) == {"rank": 1, "state": "queued", "reason": "api"}
        with pytest.raises(RejoinError, match="rank 0 is live"):
            remote.request(0)
        assert relay.RemoteRejoiner(instance).status() == \
            [{"rank": 1, "state": "queued", "reason": "api"}]
        snap = remote.snapshot()
        assert snap["joins"] == [{"dp_rank": 1, "epoch": 2}] and snap["stale"] is False
    finally:
        service.stop()
    # the launcher gone: the last records known, marked stale, and a request says why it failed
    relay.SNAPSHOT_TIMEOUT_S, old_snapshot = 0.3, relay.SNAPSHOT_TIMEOUT_S
    try:
        assert remote.status() == [{"rank": 1, "state": "queued", "reason": "api"}]
        assert remote.snapshot()["stale"] is True
    finally:
        relay.SNAPSHOT_TIMEOUT_S = old_snapshot
    relay.REQUEST_TIMEOUT_S, old = 0.5, relay.REQUEST_TIMEOUT_S
    try:
        with pytest.raises(RejoinError, match="did not answer"):
            remote.request(1)
    finally:
        relay.REQUEST_TIMEOUT_S = old


@pytest.mark.parametrize("respawn", [True, False], ids=["respawn", "no_respawn"])
def test_the_launcher_respawns_a_lost_rank_when_asked_to(instance, respawn):
    """``serve_rejoins`` (several API servers): with ``recovery.respawn`` every loss the
    launcher's monitor sees asks its rejoiner for a replacement, and its desk answers the
    API servers; without it, nothing starts by itself."""
    from types import SimpleNamespace

    from resilient_ep.engines.vllm import rejoin_hosts
    from resilient_ep.membership import Membership

    membership = Membership(2)

    class Monitor:
        def __init__(self):
            self.listeners = []
            self.membership = membership

        def add_listener(self, fn):
            self.listeners.append(fn)

    cfg = SimpleNamespace(
        additional_config={"resilience": {"instance": instance,
                                          "recovery": {"respawn": respawn}}},
        parallel_config=SimpleNamespace(data_parallel_size=2))
    manager = SimpleNamespace(_resilient_vllm_config=cfg, _resilient_addresses=object(),
                              processes=[])
    monitor = Monitor()
    asked = []
    service = rejoin_hosts.serve_rejoins(manager, monitor, None, instance)
    try:
        rejoiner = service.rejoiner
        rejoiner._worker = lambda: asked.append(list(rejoiner._queue))  # no real start
        membership.fail([1])
        for fn in monitor.listeners:
            fn(SimpleNamespace(rank=1, epoch=1))
        remote = relay.RemoteRejoiner(instance)
        if respawn:
            assert [r["reason"] for r in remote.status()] == ["respawn"] and asked == [[1]]
            with pytest.raises(RejoinError, match="already rejoining"):
                remote.request(1)
        else:
            assert remote.status() == [] and asked == []
            assert remote.request(1)["reason"] == "api"
        with pytest.raises(RejoinError, match="rank 0 is live"):
            remote.request(0)
    finally:
        service.stop()
