"""Heartbeats and leases between hosts (UDP datagrams): a lease comes only from the front
end's answer, counts from the heartbeat's send time, runs out without answers; forged,
replayed and foreign datagrams are dropped and counted."""

import socket
import time

import pytest

from resilient_ep.liveness.datagrams import BeaconReceiver, LeaseBeacon, datagram_key
from resilient_ep.transport import wire

KEY = b"i" * 32


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


@pytest.fixture
def receiver():
    r = BeaconReceiver(("127.0.0.1", 0), range(4), key=KEY)
    yield r
    r.close()


def _drain(receiver, until, timeout=5.0):
    got = []
    _wait(lambda: got.extend(receiver.receive()) or until(got), timeout)
    return got


def test_a_lease_is_the_answer_to_a_heartbeat_and_runs_out_without_one(receiver):
    b = LeaseBeacon(receiver.sock.getsockname(), 2, 0.02, 0.15, key=KEY, bind_host="127.0.0.1")
    try:
        assert not b.holds_lease()  # nothing granted yet
        got = _drain(receiver, lambda g: len(g) >= 2)
        rank, pid, seq, boot, addr = got[-1]
        assert rank == 2 and boot == b.boot and seq >= 2
        sent_at = b._sent[seq]
        receiver.grant(rank, seq, boot, addr)
        _wait(b.holds_lease)
        # counted from when that heartbeat left, not from when the answer came
        assert b.lease_until == pytest.approx(sent_at + 0.15)
        receiver.grant(rank, seq, boot, addr)  # the same answer again: a replay
        _wait(lambda: b.dropped["replay"] >= 1)
        _wait(lambda: not b.holds_lease(), timeout=2)  # no more answers: it runs out
        assert b.granted == 1
    finally:
        b.stop()


def test_forged_replayed_and_foreign_heartbeats_are_dropped(receiver):
    addr = receiver.sock.getsockname()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    k = datagram_key(KEY)

    def send(h, key=k):
        s.sendto(wire.encode_header(h, key=key), addr)
    try:
        hb = {"t": "alive", "rank": 1, "pid": 7, "seq": 5, "boot": "b1"}
        send(hb)
        assert _drain(receiver, lambda g: len(g) == 1)[0][:4] == (1, 7, 5, "b1")
        send(hb)                                   # the same datagram again
        send(dict(hb, seq=4))                      # an older one
        send(hb, key=None)                         # untagged
        send(hb, key=b"x" * 32)                    # another instance's key
        send(hb, key=KEY)                          # the instance key itself, not the derived one
        send(dict(hb, rank=9, seq=6))              # not a rank of this instance
        send(dict(hb, seq="6"))                    # malformed
        s.sendto(b"garbage", addr)
        send(dict(hb, seq=6, boot="b2"))           # a new process of rank 1: accepted
        send(dict(hb, seq=7, boot="b1"))           # the old process's, replayed after: dropped
        got = _drain(receiver, lambda g: len(g) == 1)
        assert got[0][:4] == (1, 7, 6, "b2")
        _wait(lambda: receiver.receive() or sum(receiver.dropped.values()) >= 9)
        # auth: untagged, a stranger's key, the underived key, garbage (no tag at all)
        assert receiver.dropped == {"replay": 3, "auth": 4, "non_member": 1, "fields": 1}
    finally:
        s.close()


def test_a_forged_lease_is_not_a_lease(receiver):
    b = LeaseBeacon(receiver.sock.getsockname(), 0, 0.02, 0.15, key=KEY, bind_host="127.0.0.1")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        got = _drain(receiver, lambda g: len(g) >= 1)
        rank, pid, seq, boot, addr = got[-1]
        where = b.sock.getsockname()
        for key in (None, b"x" * 32):
            s.sendto(wire.encode_header({"t": "lease", "rank": 0, "seq": seq, "boot": boot},
                                        key=key), where)
        s.sendto(wire.encode_header({"t": "lease", "rank": 0, "seq": 10**9, "boot": boot},
                                    key=datagram_key(KEY)), where)  # for a heartbeat never sent
        _wait(lambda: b.dropped["auth"] >= 1 and b.dropped["replay"] >= 1)
        assert not b.holds_lease() and b.granted == 0
    finally:
        s.close()
        b.stop()
