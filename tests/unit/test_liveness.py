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
    assert parse_beacon(b"3 1234") == ("alive", 3, 1234)
    assert parse_beacon(b"dead 2 0") == ("dead", 2, 0)
    for bad in (b"", b"x y", b"dead x 1", b"-1 5", b"1 2 3", b"\xff\xfe", b"dead 1"):
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
        for junk in (b"", b"garbage", b"dead x", b"99 1", b"dead 99 0", b"\x00" * 64):
            push.send(junk)
        _wait(lambda: mon.dropped >= 6)
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

        push.send(b"dead 2 3")                                      # a peer lost rank 2
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
