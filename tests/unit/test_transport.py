"""Conformance tests: every point-to-point transport passes ``test_transport_conformance``,
every collective group passes ``check_collective_group``; plus the wire format."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zmq

from resilient_ep.config import DetectorConfig
from resilient_ep.membership import Membership, MembershipView, RankState
from resilient_ep.transport import wire
from resilient_ep.transport.group import GroupAborted, LiveGroup, PeerLost
from resilient_ep.transport.zmq_transport import ZmqTransport, data_endpoint


def test_wire_round_trip():
    ts = [torch.randn(3, 4), torch.arange(5), torch.zeros(0, 7), torch.tensor([True, False])]
    header, out = wire.decode(wire.encode({"t": "x", "epoch": 3}, ts))
    assert header["t"] == "x" and header["epoch"] == 3
    for a, b in zip(ts, out):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _zmq_world(tmp_path, n):
    ctx = zmq.Context()
    eps = [data_endpoint("ipc", str(tmp_path), r) for r in range(n)]
    ts = [ZmqTransport(r, eps, ctx=ctx) for r in range(n)]
    for t in ts:
        assert t.wait_connected(range(n), time.monotonic() + 5) == []
    return ctx, ts


def _keyed_tcp():
    """Between hosts: TCP, every socket a CURVE server or client of the instance key (as
    every process of a multi-node instance runs). Returns the undo."""
    from resilient_ep.transport import curve

    if not curve.available():
        pytest.skip("libzmq without CURVE")
    wire.set_key(b"k" * 32, tag=False)
    curve.set_enabled(True)

    def undo():
        wire.set_key(None)
        curve.set_enabled(True)
    return undo


def _tcp_endpoints(n, channel="data"):
    from resilient_ep.runtime.rank_processes import free_port_base
    from resilient_ep.transport.addressing import Addressing

    return Addressing.tcp(["127.0.0.1"], n, free_port_base(3 * n + 1)).rank_endpoints(channel)


def _zmq_tcp_world(tmp_path, n):
    undo = _keyed_tcp()

    class Ctx(zmq.Context):  # the test terms the context last: drop the key then
        def term(self):
            super().term()
            undo()
    ctx = Ctx()
    eps = _tcp_endpoints(n)
    ts = [ZmqTransport(r, eps, ctx=ctx) for r in range(n)]
    for t in ts:
        assert t.wait_connected(range(n), time.monotonic() + 5) == []
    return ctx, ts


TRANSPORTS = [pytest.param(_zmq_world, id="zmq_ipc"), pytest.param(_zmq_tcp_world, id="zmq_tcp_curve")]


@pytest.mark.parametrize("make", TRANSPORTS)
def test_transport_conformance(tmp_path, make):
    ctx, (a, b, c) = make(tmp_path, 3)
    try:
        x = torch.randn(4, 8)
        assert a.send(1, {"t": "dispatch", "id": (0, 1)}, [x])
        h, (y,) = b.recv(time.monotonic() + 2)
        assert h["src"] == 0 and h["epoch"] == 0 and h["id"] == [0, 1] and torch.equal(x, y)  # sequences arrive as lists

        # Every receive has a deadline.
        t0 = time.monotonic()
        assert b.recv(t0 + 0.05) is None
        assert 0.04 <= time.monotonic() - t0 < 1.0

        # abort() interrupts a blocked receive.
        b.abort()
        assert b.recv(time.monotonic() + 5) is None

        # A rank outside the members is fenced: its messages are dropped, sends to it refused.
        b.configure(1, {0, 1})
        assert c.send(1, {"t": "late"}, [])
        assert b.recv(time.monotonic() + 0.2) is None
        assert not b.send(2, {"t": "x"}, [])
        assert a.send(1, {"t": "ok"}, [])
        h, _ = b.recv(time.monotonic() + 2)
        assert h["t"] == "ok"

        # A rank admitted under a newer epoch that b has not applied yet: held, not dropped.
        c.configure(2, {0, 1, 2})
        assert c.send(1, {"t": "early"}, [torch.ones(2)])
        assert b.recv(time.monotonic() + 0.2) is None
        b.configure(2, {0, 1, 2})
        h, (t,) = b.recv(time.monotonic() + 2)
        assert h["t"] == "early" and h["src"] == 2 and torch.equal(t, torch.ones(2))
        assert b.errored() is None
    finally:
        for t in (a, b, c):
            t.shutdown()
        ctx.term()


def test_send_to_dead_peer_is_refused_not_blocking(tmp_path):
    ctx, (a, b) = _zmq_world(tmp_path, 2)
    try:
        b.shutdown()
        deadline = time.monotonic() + 5
        while a.send(1, {"t": "x"}, [torch.zeros(1)]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not a.send(1, {"t": "x"}, [torch.zeros(1)])
    finally:
        a.shutdown()
        ctx.term()


# ---------------------------------------------------------------------- collective groups
# Short heartbeats; a long hang timeout so that a busy machine never fences a healthy thread
# (members that leave are seen by their sockets dropping, at once).
FAST = DetectorConfig(heartbeat_interval_ms=10, heartbeat_timeout_ms=3000)


def _together(members, fn, timeout=30):
    """Run ``fn(member)`` for every member at once, one thread each; their results in order."""
    with ThreadPoolExecutor(len(members)) as ex:
        futures = [ex.submit(fn, m) for m in members]
        return [f.result(timeout=timeout) for f in futures]


def _in_thread(fn):
    """Start ``fn()`` in a thread; returns a callable that joins it and returns (value, exc)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["exc"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join(timeout=10):
        t.join(timeout)
        assert not t.is_alive(), "the collective did not return"
        return box.get("value"), box.get("exc")
    return join


def _until_not_lost(g, tensors, *, strict=True, budget_s=10):
    """Run the collective until it completes; the PeerLost raised on the way, in order."""
    lost = []
    end = time.monotonic() + budget_s
    while True:
        try:
            return g.allgather(tensors, strict=strict, deadline=end), lost
        except PeerLost as e:
            lost.append(e)


def _ranks(got):
    return {r: int(ts[0][0]) for r, ts in got.items()}


def check_collective_group(make):
    """What every collective group (``allgather``/``alltoall`` among live members, with the
    I/O lifecycle) must do. ``make(n, name, memberships={rank: Membership})`` returns n
    members of a fresh group, connected to each other in this process."""
    # Values: allgather and alltoall, strict and lenient, several rounds.
    gs = make(3, "values")
    for i in range(3):
        got = _together(gs, lambda g: g.allgather([torch.tensor([g.rank, i])]))
        assert all(sorted(x) == [0, 1, 2] for x in got)
        assert all(torch.equal(x[r][0], torch.tensor([r, i])) for x in got for r in range(3))
        got = _together(gs, lambda g: g.allgather([torch.tensor([g.rank])], strict=False))
        assert all(_ranks(x) == {0: 0, 1: 1, 2: 2} for x in got)
        got = _together(gs, lambda g: g.alltoall(
            {p: [torch.tensor([10 * g.rank + p]), torch.ones(2, i)] for p in range(3)}))
        for me, x in enumerate(got):
            assert _ranks(x) == {src: 10 * src + me for src in range(3)}
            assert all(ts[1].shape == (2, i) for ts in x.values())
    assert all(g.errored() is None and g.epoch == 0 and g.live == [0, 1, 2] for g in gs)

    # Deadline: a member that does not take part makes the others time out, naming it; it
    # completes the same key later with what they sent, and every member is in step again.
    gs = make(3, "deadline")
    t0 = time.monotonic()
    errs = _together(gs[:2], lambda g: _raised(g.allgather, [torch.tensor([g.rank])],
                                               deadline=time.monotonic() + 0.3))
    assert 0.25 <= time.monotonic() - t0 < 3
    for e in errs:
        assert isinstance(e, TimeoutError), e
        assert "'deadline'" in str(e) and "[2]" in str(e) and "('s', 0, 0)" in str(e)
    assert _ranks(gs[2].allgather([torch.tensor([2])], deadline=time.monotonic() + 5)) == \
        {0: 0, 1: 1, 2: 2}
    got = _together(gs, lambda g: g.allgather([torch.tensor([g.rank + 5])],
                                              deadline=time.monotonic() + 5))
    assert all(_ranks(x) == {0: 5, 1: 6, 2: 7} for x in got)
    assert all(g.errored() is None and not g.dead for g in gs)

    # abort(): a collective blocked in another thread raises at once; every later one too,
    # until configure() re-arms the group.
    gs = make(3, "abort")
    join = _in_thread(lambda: gs[0].allgather([torch.tensor([0])]))
    time.sleep(0.1)
    t0 = time.monotonic()
    gs[0].abort()
    _, exc = join()
    assert isinstance(exc, GroupAborted) and time.monotonic() - t0 < 1.0
    assert isinstance(gs[0].errored(), GroupAborted)
    assert isinstance(_raised(gs[0].allgather, [torch.tensor([0])]), GroupAborted)
    gs[0].configure(gs[0].epoch, range(3))
    assert gs[0].errored() is None
    got = _together(gs[1:], lambda g: g.allgather([torch.tensor([g.rank])],
                                                  deadline=time.monotonic() + 5))
    assert all(_ranks(x) == {0: 0, 1: 1, 2: 2} for x in got)  # the aborted one's contribution
    got = _together(gs, lambda g: g.allgather([torch.tensor([g.rank + 1])],
                                              deadline=time.monotonic() + 5))
    assert all(_ranks(x) == {0: 1, 1: 2, 2: 3} for x in got)

    # A member that leaves (shutdown): strict collectives raise PeerLost once on every
    # survivor, then run among the survivors; the member's own collectives refuse to run.
    gs = make(3, "strict")
    _together(gs, lambda g: g.allgather([torch.tensor([g.rank])]))
    gs[2].shutdown()
    gs[2].shutdown()  # idempotent
    assert isinstance(_raised(gs[2].allgather, [torch.tensor([2])]), GroupAborted)
    for got, lost in _together(gs[:2], lambda g: _until_not_lost(g, [torch.tensor([g.rank])])):
        assert len(lost) == 1 and lost[0].dead == {2} and lost[0].epoch == 1
        assert _ranks(got) == {0: 0, 1: 1}
    for g in gs[:2]:
        assert g.dead == {2} and g.live == [0, 1] and g.epoch == 1
        assert g.cause(2) in ("crash", "reported") and g.errored() is None

    # Lenient: completes over the survivors and never raises.
    gs = make(3, "lenient")
    _together(gs, lambda g: g.allgather([torch.tensor([g.rank])], strict=False))
    gs[1].close()  # the old name of shutdown
    for got, lost in _together([gs[0], gs[2]], lambda g: _until_not_lost(
            g, [torch.tensor([g.rank])], strict=False)):
        assert lost == [] and _ranks(got) == {0: 0, 2: 2}

    # configure(epoch, members): adopted when not older; outsiders dead, an outsider itself
    # fenced; a collective blocked in another thread sees it at once.
    gs = make(3, "configure")
    changes = []
    gs[0].add_listener(lambda dead, epoch: changes.append((sorted(dead), epoch)))
    for g in gs:
        g.configure(5, {0, 1})
    assert changes == [([2], 5)]  # listeners hear the configured epoch
    for g in gs[:2]:
        assert g.dead == {2} and g.epoch == 5 and g.cause(2) == "configured"
    assert isinstance(gs[2].errored(), GroupAborted)
    assert isinstance(_raised(gs[2].allgather, [torch.tensor([2])]), GroupAborted)
    for got, lost in _together(gs[:2], lambda g: _until_not_lost(g, [torch.tensor([g.rank])])):
        assert [e.epoch for e in lost] == [5] and _ranks(got) == {0: 0, 1: 1}
    gs[0].configure(3, {0})  # older: ignored
    assert gs[0].dead == {2} and gs[0].epoch == 5
    join = _in_thread(lambda: gs[0].allgather([torch.tensor([0])]))
    time.sleep(0.1)
    gs[0].configure(6, {0})
    _, exc = join()
    assert isinstance(exc, PeerLost) and exc.dead == {1, 2} and exc.epoch == 6
    assert _ranks(gs[0].allgather([torch.tensor([0])], deadline=time.monotonic() + 5)) == {0: 0}
    assert gs[0].errored() is None


def check_membership_authority(make):
    """A group given the process's Membership writes what it finds out into it and takes
    out what others decided there."""
    with pytest.raises(ValueError, match="membership has 2 ranks"):
        make(3, "wrong-size", memberships={0: Membership(2)})
    m = Membership(3)
    gs = make(3, "authority", memberships={0: m})
    _together(gs, lambda g: g.allgather([torch.tensor([g.rank])]))  # all up and heard from
    gs[2].shutdown()
    for got, lost in _together(gs[:2], lambda g: _until_not_lost(g, [torch.tensor([g.rank])])):
        assert len(lost) == 1 and _ranks(got) == {0: 0, 1: 1}
    assert m.state(2) is RankState.DEAD and m.epoch == 1 and gs[0].epoch == 1
    m.fail([1], state=RankState.FENCED)  # another component of this process decides
    got, lost = _until_not_lost(gs[0], [torch.tensor([0])])
    assert [(e.dead, e.epoch) for e in lost] == [({1, 2}, 2)] and _ranks(got) == {0: 0}
    assert gs[0].cause(1) == "reported" and gs[0].epoch == m.epoch == 2
    gs[0].configure(7, {0})
    assert m.epoch == 7 and gs[0].epoch == 7
    m.fail([0])  # this member itself taken out: fenced
    assert isinstance(_raised(gs[0].allgather, [torch.tensor([0])]), GroupAborted)


def check_membership_replica(make):
    """A group whose Membership replicates another process's authority writes nothing into
    it: it acts on a loss it finds out at once (the collective completes over the survivors)
    and reports the epoch the authority decides, when the replica learns it."""
    m = Membership(3)
    gs = make(3, "replica", memberships={0: m}, replica=True)
    _together(gs, lambda g: g.allgather([torch.tensor([g.rank])]))
    gs[2].shutdown()
    for got, lost in _together(gs[:2], lambda g: _until_not_lost(g, [torch.tensor([g.rank])])):
        assert len(lost) == 1 and _ranks(got) == {0: 0, 1: 1}
    assert gs[0].dead == {2} and m.epoch == 0 and m.view().live_ranks == (0, 1, 2)
    # the authority (elsewhere) fenced rank 2 at its epoch 4: the replica adopts it
    m.adopt(MembershipView(4, (RankState.LIVE, RankState.LIVE, RankState.FENCED)))
    gs[0].configure(4, {0, 1})
    assert gs[0].epoch == 4 and gs[0].dead == {2} and m.epoch == 4


def _raised(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - handed to the test
        return e
    raise AssertionError(f"{fn} did not raise")


def _live_groups(tmp_path, tcp=False):
    undo = _keyed_tcp() if tcp else (lambda: None)
    ctx = zmq.Context()
    made = []

    def make(n, name, memberships=None, replica=False):
        eps = _tcp_endpoints(n) if tcp else [f"ipc://{tmp_path}/{name}-{r}" for r in range(n)]
        gs = []
        try:
            for r in range(n):
                gs.append(LiveGroup(name, r, eps, detector=FAST, ctx=ctx,
                                    membership=(memberships or {}).get(r),
                                    membership_replica=replica))
        finally:
            made.extend(gs)
        return gs

    def close():
        for g in made:
            g.shutdown()
        ctx.term()
        undo()
    return make, close


GROUPS = [pytest.param(_live_groups, id="live_group_ipc"),
          pytest.param(lambda tmp_path: _live_groups(tmp_path, tcp=True), id="live_group_tcp_curve")]


@pytest.mark.parametrize("world", GROUPS)
@pytest.mark.parametrize("check", [check_collective_group, check_membership_authority,
                                   check_membership_replica],
                         ids=["collectives", "membership", "replica"])
def test_collective_group_conformance(tmp_path, world, check):
    make, close = world(tmp_path)
    try:
        check(make)
    finally:
        close()


def test_a_group_under_malformed_traffic_changes_nothing(tmp_path):
    """A few thousand random and malformed packets pushed into a running group's inbox (what
    anyone on the host could send): nothing changes (members, epoch, collective results), every
    one is dropped and counted, no receive loop raises. (Well-formed forgeries are the
    authentication's business.)"""
    import random

    import msgpack

    ctx = zmq.Context()
    eps = [f"ipc://{tmp_path}/fuzz-{r}" for r in range(3)]
    gs = [LiveGroup("fuzz", r, eps, detector=FAST, ctx=ctx) for r in range(3)]
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(eps[0])
    rng = random.Random(7)
    prefix = wire.MAGIC + bytes([wire.VERSION])
    bad_headers = [{"t": "c", "src": "1"}, {"t": "c", "src": 9, "dead": []},
                   {"t": "hb", "src": 1, "dead": [99]}, {"t": "c", "src": 1, "dead": [],
                                                         "key": "x"},
                   {"t": 3, "src": 1}, {"src": 1, "dead": "all"}, [1, 2, 3], "bye"]
    try:
        _together(gs, lambda g: g.allgather([torch.tensor([g.rank])]))
        sent = 0
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))]
            elif kind == 1:
                frames = [prefix + msgpack.packb(rng.choice(bad_headers))]
            else:  # a well-formed header whose tensor frames do not match it
                frames = [wire.encode_header({"t": "c", "src": 1, "dead": [], "key": ["l", 0],
                                              "tensors": [["torch.float32", [4]]]}), b"xy"]
            push.send_multipart(frames)
            sent += 1
        for _ in range(3):
            got = _together(gs, lambda g: g.allgather([torch.tensor([g.rank * 10])]))
            assert [_ranks(x) for x in got] == [{0: 0, 1: 10, 2: 20}] * 3
        deadline = time.monotonic() + 10
        while sum(gs[0].dropped.values()) < sent and time.monotonic() < deadline:
            _together(gs, lambda g: g.allgather([torch.tensor([g.rank])]))  # pumps the inbox
        assert sum(gs[0].dropped.values()) == sent, gs[0].dropped
        assert all(g.dead == frozenset() and g.epoch == 0 and g.errored() is None for g in gs)
    finally:
        push.close(linger=0)
        for g in gs:
            g.shutdown()
        ctx.term()


@pytest.mark.parametrize("use_curve, where", [(False, "ipc"), (True, "ipc"), (True, "tcp")],
                         ids=["tag", "curve", "curve_tcp"])
def test_forged_well_formed_messages_are_refused_with_an_instance_key(tmp_path, use_curve, where):
    """With the instance key (every process of an instance has it), a forged heartbeat, a
    forged "bye" and a forged contribution from a process without it change neither
    membership nor results: with the tag alone they are dropped as ``auth``; with CURVE
    they never get through the handshake (nothing reaches the receive loop)."""
    from resilient_ep.transport import curve

    if use_curve and not curve.available():
        pytest.skip("libzmq without CURVE")
    ctx = zmq.Context()
    wire.set_key(b"i" * 32)
    curve.set_enabled(use_curve)
    eps = _tcp_endpoints(3) if where == "tcp" else [f"ipc://{tmp_path}/auth-{r}" for r in range(3)]
    gs = [LiveGroup("auth", r, eps, detector=FAST, ctx=ctx) for r in range(3)]
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(eps[0])
    try:
        _together(gs, lambda g: g.allgather([torch.tensor([g.rank])]))
        for key in (None, b"x" * 32):  # no key, a wrong key
            for frames in ([wire.encode_header({"t": "bye", "src": 1, "epoch": 0, "dead": []},
                                               key=key)],
                           [wire.encode_header({"t": "hb", "src": 2, "epoch": 5, "dead": [1]},
                                               key=key)],
                           [wire.encode_header({"t": "c", "src": 1, "dead": [], "key": ["s", 0, 1],
                                                "epoch": 0, "tensors": [["torch.int64", [1]]]},
                                               key=key), torch.tensor([666]).numpy()]):
                try:  # with CURVE the forger's connection never comes up: nowhere to send
                    push.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        got = _together(gs, lambda g: g.allgather([torch.tensor([g.rank * 10])]))
        assert [_ranks(x) for x in got] == [{0: 0, 1: 10, 2: 20}] * 3
        want = 0 if use_curve else 6
        deadline = time.monotonic() + (1 if use_curve else 10)
        while gs[0].dropped.get("auth", 0) < 6 and time.monotonic() < deadline:
            _together(gs, lambda g: g.allgather([torch.tensor([g.rank])]))
        assert gs[0].dropped.get("auth", 0) == want, gs[0].dropped
        assert all(g.dead == frozenset() for g in gs)
    finally:
        push.close(linger=0)
        for g in gs:
            g.shutdown()
        ctx.term()
        wire.set_key(None)
        curve.set_enabled(True)
