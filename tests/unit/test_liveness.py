"""The core's liveness monitor over real processes: an exit, a hang (beacons stop), a loss
reported by a peer group, malformed traffic dropped, and a subscriber in another "process"
(thread) that sees the same losses at the same epochs."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import zmq

from resilient_ep.config import DetectorConfig
from resilient_ep.liveness import Beacon, LivenessMonitor, MembershipSubscriber, parse_beacon
from resilient_ep.liveness.beacons import alive_message, dead_message
from resilient_ep.transport import wire
from resilient_ep.membership import Membership, RankState

DET = DetectorConfig(heartbeat_interval_ms=20, heartbeat_timeout_ms=400)


def _rank_main(endpoint: str, rank: int) -> None:
    Beacon(endpoint, rank, DET.heartbeat_interval_ms / 1000)
    time.sleep(60)


def _wait(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_parse_beacon():
    assert parse_beacon(alive_message(3, 1234)) == ("alive", 3, 1234)
    assert parse_beacon(dead_message(2, 0)) == ("dead", 2, 0)
    forged = [wire.encode_header(h) for h in (
        {"t": "alive", "rank": -1, "pid": 5}, {"t": "alive", "rank": "1", "pid": 5},
        {"t": "alive", "rank": True, "pid": 5}, {"t": "dead", "rank": 1}, {"t": "x", "rank": 1},
        {"rank": 1, "pid": 2}, {"t": "alive", "rank": 1.0, "pid": 2})]
    for bad in (b"", b"3 1234", b"dead 2 0", b"\xff\xfe", b"REP\x01\xc1", b"REP\x02\x80",
                *forged):
        assert parse_beacon(bad) is None, bad


@pytest.fixture
def ranks(tmp_path):
    ctx = mp.get_context("spawn")
    beacons = f"ipc://{tmp_path}/beacons"
    procs = {r: ctx.Process(target=_rank_main, args=(beacons, r), daemon=True) for r in range(4)}
    for p in procs.values():
        p.start()
    yield procs, beacons, tmp_path
    for p in procs.values():
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(5)


def test_exit_hang_report_and_subscriber(ranks):
    procs, beacons, tmp = ranks
    membership = Membership(4)
    fenced = []

    def fence(rank: int, why: str) -> None:
        fenced.append((rank, why))
        os.kill(procs[rank].pid, signal.SIGKILL)

    mon = LivenessMonitor(membership, procs, detector=DET, beacon_endpoint=beacons,
                          publish_endpoint=f"ipc://{tmp}/membership", fence=fence)
    seen = []
    mon.add_listener(seen.append)
    mon.start()
    other = Membership(4)
    followed = []
    sub = MembershipSubscriber(f"ipc://{tmp}/membership", other, followed.append).start()
    try:
        _wait(lambda: len(mon.detector._last) == 4)  # every rank heard from
        # malformed and foreign traffic changes nothing
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(beacons)
        for junk in (b"", b"garbage", b"dead 1 0", alive_message(99, 1), dead_message(99, 0),
                     b"\x00" * 64):
            push.send(junk)
        _wait(lambda: sum(mon.dropped.values()) >= 6)
        assert membership.epoch == 0 and not seen

        os.kill(procs[0].pid, signal.SIGKILL)                       # a crash
        _wait(lambda: len(seen) == 1)
        assert (seen[0].rank, seen[0].cause, seen[0].epoch) == (0, "exit", 1)
        assert membership.state(0) is RankState.DEAD

        os.kill(procs[1].pid, signal.SIGSTOP)                       # a hang
        t0 = time.monotonic()
        _wait(lambda: len(seen) == 2)
        assert time.monotonic() - t0 >= DET.heartbeat_timeout_ms / 1000 * 0.8
        assert (seen[1].rank, seen[1].cause) == (1, "hang")
        assert membership.state(1) is RankState.FENCED

        push.send(dead_message(2, 3))                               # a peer lost rank 2
        _wait(lambda: len(seen) == 3)
        assert (seen[2].rank, seen[2].cause, seen[2].epoch) == (2, "reported", 3)
        assert [r for r, _ in fenced] == [1, 2]
        push.close(linger=0)

        _wait(lambda: len(followed) == 3)
        assert followed == seen and other.view() == membership.view()
        assert membership.view().live_ranks == (3,)
    finally:
        sub.stop()
        mon.stop()
    assert mon.errored() is None


def test_subscriber_keeps_the_authoritys_epochs(tmp_path):
    """A replica takes each loss at the epoch its authority gave it, even where its own count
    would differ (the authority's epoch also moves for joins), and drops malformed lists."""
    ep = f"ipc://{tmp_path}/membership"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(ep)
    replica = Membership(4)
    followed = []
    sub = MembershipSubscriber(ep, replica, followed.append).start()
    joined = []
    sub.on_join = joined.append
    losses = [{"kind": "loss", "rank": 2, "cause": "exit", "exitcode": -9,
               "detected_monotonic": 1.0, "epoch": 3},
              {"kind": "loss", "rank": 0, "cause": "hang", "exitcode": -9,
               "detected_monotonic": 2.0, "epoch": 5}]
    join = {"kind": "join", "rank": 2, "joined_monotonic": 3.0, "epoch": 7}
    backwards = [join, losses[0]]  # epochs never go back within one log
    try:
        deadline = time.monotonic() + 10
        while len(followed) < 2 and time.monotonic() < deadline:
            pub.send(b"not ours")
            pub.send(wire.encode_header({"t": "membership", "events": [{"rank": "x"}]}))
            pub.send(wire.encode_header({"t": "membership", "events": backwards}))
            pub.send(wire.encode_header({"t": "membership", "events": losses}))
            time.sleep(0.05)
        assert [(x.rank, x.epoch) for x in followed] == [(2, 3), (0, 5)]
        assert replica.epoch == 5
        assert replica.state(2) is RankState.DEAD and replica.state(0) is RankState.FENCED
        assert sum(sub.dropped.values()) >= 3
        assert joined == []
        while not joined and time.monotonic() < deadline:  # the log grows by a join
            pub.send(wire.encode_header({"t": "membership", "events": [*losses, join]}))
            time.sleep(0.05)
        assert [(x.rank, x.epoch) for x in joined] == [(2, 7)] and len(followed) == 2
        assert replica.epoch == 7 and replica.state(2) is RankState.LIVE
        assert [x.epoch for x in sub.events] == [3, 5, 7]
    finally:
        sub.stop()
        pub.close(linger=0)


def test_tracker_decisions_without_threads():
    """The authority's decisions on their own (the reference coordinator's use): a fence is
    the loss itself (``out_at_fence``), losses seen together share one epoch, foreign and
    malformed beacons are dropped, and a rank taken back is watched afresh."""
    from resilient_ep.liveness import LivenessTracker

    m = Membership(4)
    fenced = []
    t = LivenessTracker(m, range(4), detector=DET, out_at_fence=True,
                        fence=lambda r, why: fenced.append(r))
    for r in range(4):
        t.watch(r, now=0.0)
    for now in (0.1, 0.2, 0.3):
        for r in (0, 1, 2):  # rank 3 stays silent
            assert t.beacon(alive_message(r, 100 + r), now) == ("alive", r, 100 + r)
        assert t.poll(now) == []
    for junk in (alive_message(9, 1), b"x", dead_message(7, 0)):
        assert t.beacon(junk, 0.3) is None
    assert sum(t.dropped.values()) == 3
    [hang] = t.poll(0.45)  # 450 ms since rank 3 was last heard: past the 400 ms timeout
    assert (hang.rank, hang.cause, hang.kind, hang.epoch) == (3, "hang", "hang", 1)
    assert fenced == [3] and m.state(3) is RankState.FENCED
    t.disconnected(0, 0.46)
    t.disconnected(1, 0.46)
    both = t.poll(0.47)
    assert [(x.rank, x.kind, x.epoch) for x in both] == [(0, "crash", 2), (1, "crash", 2)]
    assert t.exited(0) == [] and t.poll(0.48) == []  # already out: nothing more
    # rank 3 woke up and was taken back: watched again, silent again, fenced again
    m.begin_join([3])
    m.join([3])
    t.watch(3, now=1.0)
    got = []  # (the first poll after a pause shifts every deadline by the pause: the
    #           detector's guard against blaming ranks for its own host's stall)
    for now in [1.0 + i / 10 for i in range(1, 15)]:  # rank 2 beacons, rank 3 is silent
        t.beacon(alive_message(2, 102), now)
        got += t.poll(now)
    [again] = got
    assert (again.rank, again.epoch) == (3, 4) and t.losses[-1] == again


def test_a_monitor_loop_that_raises_is_restarted_and_counted(ranks):
    """A bug in the monitor's loop (here its host's tick raising, once) costs a restart, not
    the instance's failure detection."""
    procs, beacons, tmp = ranks
    calls = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the host's bookkeeping")

    membership = Membership(4)
    mon = LivenessMonitor(membership, procs, detector=DET, beacon_endpoint=beacons,
                          fence=lambda r, why: os.kill(procs[r].pid, signal.SIGKILL), tick=tick)
    seen = []
    mon.add_listener(seen.append)
    mon.start()
    try:
        _wait(lambda: mon.restarts == 1 and len(calls) >= 2)
        os.kill(procs[2].pid, signal.SIGKILL)
        _wait(lambda: len(seen) == 1)
        assert (seen[0].rank, seen[0].cause, seen[0].epoch) == (2, "exit", 1)
        assert mon.alive and mon.errored() is None
    finally:
        mon.stop()


def test_a_replacement_joins_and_its_loss_while_joining_is_a_loss(ranks):
    """The authority takes a lost rank back: a replacement process is watched from its start
    (``begin_join``: state joining, no epoch), ``admit`` makes it live with one epoch bump,
    published in order after the loss; a replacement that dies while it warms up is a loss of
    its own and cannot be admitted."""
    procs, beacons, tmp = ranks
    ctx = mp.get_context("spawn")
    membership = Membership(4)
    mon = LivenessMonitor(membership, procs, detector=DET, beacon_endpoint=beacons,
                          publish_endpoint=f"ipc://{tmp}/membership",
                          fence=lambda r, why: os.kill(procs[r].pid, signal.SIGKILL))
    joins, losses = [], []
    mon.add_join_listener(joins.append)
    mon.add_listener(losses.append)
    mon.start()
    replica = Membership(4)
    followed, sub_joins = [], []
    sub = MembershipSubscriber(f"ipc://{tmp}/membership", replica, followed.append,
                               on_join=sub_joins.append).start()
    spare = []
    try:
        os.kill(procs[1].pid, signal.SIGKILL)
        _wait(lambda: len(losses) == 1)
        with pytest.raises(ValueError, match="only a lost rank"):
            mon.begin_join(2, procs[2])
        new = ctx.Process(target=_rank_main, args=(beacons, 1), daemon=True)
        new.start()
        spare.append(new)
        mon.begin_join(1, new)
        assert membership.state(1) is RankState.JOINING and membership.epoch == 1
        join = mon.admit(1)
        assert (join.rank, join.epoch) == (1, 2) and joins == [join]
        assert membership.state(1) is RankState.LIVE
        _wait(lambda: sub_joins)
        assert replica.view() == membership.view() and [x.epoch for x in sub.events] == [1, 2]
        # the replacement is watched like any rank: its death is a loss at the next epoch
        os.kill(new.pid, signal.SIGKILL)
        _wait(lambda: len(losses) == 2)  # (the listeners hear of it after the state changed)
        assert (losses[-1].rank, losses[-1].epoch) == (1, 3)
        assert membership.state(1) is RankState.DEAD
        # a second replacement dies before it is admitted: a loss, and admit refuses
        doomed = ctx.Process(target=_rank_main, args=(beacons, 1), daemon=True)
        doomed.start()
        spare.append(doomed)
        mon.begin_join(1, doomed)
        os.kill(doomed.pid, signal.SIGKILL)
        _wait(lambda: len(losses) == 3)
        assert (losses[-1].rank, losses[-1].epoch) == (1, 4)
        with pytest.raises(RuntimeError, match="lost while it warmed up"):
            mon.admit(1)
        _wait(lambda: len(sub.events) == 4)
        assert [type(x).__name__ for x in mon.events] == ["RankLoss", "RankJoin", "RankLoss",
                                                          "RankLoss"]
        assert replica.view() == membership.view()
    finally:
        sub.stop()
        mon.stop()
        for p in spare:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)
    assert mon.errored() is None
