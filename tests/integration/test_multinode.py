"""The reference runtime across hosts: 4 ranks on 2 "nodes" (network namespaces of the test
bed, ``resilient_ep.netbed``), the front end on node 0, every socket on TCP at its node's
address, heartbeats and leases as datagrams. Real processes, real SIGKILLs, real cut
cables; every output compared with the single-process failure-free run."""

import random
import time

import pytest

from resilient_ep.config import ResilienceConfig
from resilient_ep.runtime.coordinator import Coordinator

pytestmark = pytest.mark.integration
TIMEOUT = 120
MAX_TOKENS = 24  # as in conftest.reference
BASE_PORT = 23000  # every bed is its own set of namespaces: runs never share a port


def _config(bed, *overrides):
    # Every expert on both nodes (two replicas, mirror pairs across nodes). A long heartbeat
    # timeout where the test is not about it: a loaded 2-core CI machine can deschedule a
    # healthy rank for longer than the 150 ms default.
    return ResilienceConfig().with_overrides([
        "transport.address=tcp", f"transport.node_addresses=[{', '.join(bed.addresses)}]",
        f"transport.base_port={BASE_PORT}", "placement.redundant_slots_per_rank=2",
        "detector.heartbeat_timeout_ms=3000", *overrides])


def _start(bed, model_dir, config):
    """The front end runs in this process, its sockets in node 0; ranks 2k, 2k+1 on node k."""
    with bed.entered(0):
        return Coordinator(model_dir, num_ranks=4, config=config, launcher=bed.prefix).start()


def _wait(cond, what, timeout=TIMEOUT, every=0.02):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(every)


def _mid_stream(recs, ranks, rng):
    """Wait until some request of ``ranks`` has streamed a (seeded) random 2-8 tokens: the
    moment a failure is injected. Returns that rank's requests still running then."""
    at = rng.randint(2, 8)
    _wait(lambda: all(r.owner >= 0 for r in recs), "every request admitted")
    mine = [r for r in recs if r.owner in ranks]
    assert mine, f"no request on ranks {ranks}"
    _wait(lambda: any(len(r.generated) >= at for r in mine), f"{at} tokens on ranks {ranks}",
          every=0.002)
    return [r for r in mine if not r.finished]


def _assert_equal_to_reference(recs, reference):
    for r, ref in zip(recs, reference):
        assert r.error is None, f"{r.rid}: {r.error}"
        assert r.generated == ref, f"{r.rid} (moved {r.migrations}x) differs from the failure-free run"


def _state(c, rank):
    return c.status()["ranks"][rank]["state"]


def test_ranks_on_two_nodes_serve_like_one_process(netbed, model_dir, prompts, reference):
    c = _start(netbed, model_dir, _config(netbed))
    try:
        assert set(c.pids[2:]) <= set(netbed.pids(1)), "ranks 2, 3 run on node 1"
        assert not set(c.pids[:2]) & set(netbed.pids(1))
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in recs:
            r.wait(TIMEOUT)
        _assert_equal_to_reference(recs, reference)
        st = c.status()
        assert st["epoch"] == 0 and st["hosts"]["nodes"] == 2
        assert st["hosts"]["node_addresses"] == netbed.addresses
        assert {r.owner for r in recs} == {0, 1, 2, 3}
        assert st["hosts"]["datagrams_dropped"] == {}
    finally:
        c.shutdown()


@pytest.mark.parametrize("power_off", [False, True], ids=["killed", "powered_off"])
def test_a_lost_node_its_requests_resume_on_the_other_from_checkpoints_there(
        netbed, model_dir, prompts, reference, power_off):
    """Every process of node 1 SIGKILLed at once (``powered_off``: its cable cut first, so no
    FIN or RST tells anyone and only the heartbeats can). Its requests resume on node 0 from
    the KV checkpoints node 0 holds; node 0 holds a replica of every expert."""
    rng = random.Random(1300 + power_off)
    c = _start(netbed, model_dir, _config(
        netbed, *(["detector.heartbeat_timeout_ms=1000"] if power_off else []),
        "kv_checkpoint.interval_tokens=4"))
    try:
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        unfinished = _mid_stream(recs, (2, 3), rng)
        netbed.kill_node(1, power_off=power_off)
        for r in recs:
            r.wait(TIMEOUT)
        _assert_equal_to_reference(recs, reference)
        st = c.status()
        # Killed: the dropped connections say so at once (dead). Powered off: only silence
        # (fenced, after the heartbeat timeout).
        assert [st["ranks"][r]["state"] for r in (2, 3)] == ["fenced" if power_off else "dead"] * 2
        assert st["uncovered_experts"] == []
        assert sorted(f.rank for f in c.failures) == [2, 3]
        moved = [r for r in recs if r.migrations]
        assert unfinished and all(r.migrations for r in unfinished)
        restored = {r.rid: c.kv.requests.get(r.rid, {}) for r in moved}
        from_ckpt = [rid for rid, info in restored.items() if info.get("restored", 0) > 0]
        assert from_ckpt, f"no moved request resumed from a checkpoint: {restored}"
        for rid in from_ckpt:  # the copy that served it was kept on node 0
            assert restored[rid]["source"] in ("peer:0", "peer:1"), restored[rid]
            assert restored[rid]["restored_on"] in (0, 1)
    finally:
        c.shutdown()


def test_a_partition_fences_the_isolated_node_which_serves_nothing_twice(
        netbed, model_dir, prompts, reference):
    """Node 1's cable is cut mid-stream: node 1's ranks lose their lease and stop by
    themselves, the front end fences them after the heartbeat timeout and moves their
    requests to node 0. The cable comes back: the old ranks' late messages change nothing,
    they are taken back, and a second wave runs on all four ranks; every stream equals the
    failure-free run, token for token (a token served twice would show as a difference)."""
    rng = random.Random(1313)
    c = _start(netbed, model_dir, _config(netbed, "detector.heartbeat_timeout_ms=1000"))
    try:
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        unfinished = _mid_stream(recs, (2, 3), rng)
        netbed.set_link(1, up=False)
        _wait(lambda: _state(c, 2) == "fenced" and _state(c, 3) == "fenced",
              "the isolated ranks fenced")
        for r in recs:
            r.wait(TIMEOUT)
        _assert_equal_to_reference(recs, reference)
        assert unfinished and all(r.migrations for r in unfinished)
        netbed.set_link(1, up=True)
        _wait(lambda: _state(c, 2) == "live" and _state(c, 3) == "live",
              "the isolated ranks taken back after the partition")
        wave = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in wave:
            r.wait(TIMEOUT)
        _assert_equal_to_reference(wave, reference)
        _assert_equal_to_reference(recs, reference)  # nothing late was added to the first wave
        assert {r.owner for r in wave} == {0, 1, 2, 3}
        assert [f.kind for f in c.failures] == ["hang", "hang"]
        lease = c.status()["hosts"]["lease"]
        assert lease["2"]["expiries"] >= 1 and lease["3"]["expiries"] >= 1, lease
    finally:
        c.shutdown()


HEARTBEATS = """
import json, sys, time
from resilient_ep.liveness.datagrams import LeaseBeacon

class Logged(LeaseBeacon):  # every send's (seq, monotonic time): the test tells stalls apart
    def __init__(self, *a, **kw):
        self.log = []
        super().__init__(*a, **kw)

    def _send(self, now):
        super()._send(now)
        self.log.append((self._seq, now))

host, port, bind, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
beacons = [Logged((host, port), r, 0.05, 0.2, key=b"k" * 32, bind_host=bind) for r in range(4)]
held, expiries = [False] * 4, [0] * 4
end = time.monotonic() + seconds
while time.monotonic() < end:
    for r, b in enumerate(beacons):
        ok = b.holds_lease()
        expiries[r] += held[r] and not ok
        held[r] = ok
    time.sleep(0.005)
print(json.dumps({"expiries": expiries, "held": held, "sent": [b.sent for b in beacons],
                  "granted": [b.granted for b in beacons], "log": [b.log for b in beacons]}),
      flush=True)
"""

LINK_DELAY_S = 0.010  # one way, as impaired below
STALL_SEND_GAP_S = 0.100  # two heartbeat intervals between one beacon's sends
STALL_TRANSIT_S = 0.060  # six times the link's constant one-way delay


def _stalls(sent_logs, arrivals):
    """The intervals in which a process of the test bed, not the link, held heartbeats up:
    a beacon thread that sent nothing for two intervals (its process was not scheduled), or
    a heartbeat that arrived long after its send (the user-space link emulator or the
    receiver was not scheduled: the emulated link's delay is constant). Both clocks are the
    same CLOCK_MONOTONIC: network namespaces do not change it."""
    out = []
    for log in sent_logs:
        for (_, a), (_, b) in zip(log, log[1:]):
            if b - a > STALL_SEND_GAP_S:
                out.append((a, b))
    sent_at = [dict(log) for log in sent_logs]
    for rank, seq, t in arrivals:
        sent = sent_at[rank].get(seq)
        if sent is not None and t - sent > STALL_TRANSIT_S:
            out.append((sent, t))
    return out


@pytest.mark.netbed(link="emulated", seed=21)
def test_heartbeats_over_a_slow_lossy_link_raise_no_suspicion_at_the_documented_timeouts(netbed):
    """The liveness channel alone (no model): four ranks' heartbeats from node 1 to the
    front end on node 0 across 20 ms RTT and 1 % loss each way, watched by the failure
    detector at what docs/multinode.md gives for that link (50 ms heartbeats, 200 ms
    timeout), each answered with a lease (200 ms) as the front end does. The link never
    silences a rank: a suspicion while the rank still sends must fall in a measured stall of
    the test bed's own processes (a beacon that did not send for two intervals, a heartbeat
    60 ms in transit on a 10 ms link: the sender, the user-space link emulator or this
    process off a shared CPU). The silence after the sender's last heartbeat is not one: CI
    once suspected ranks 1-3 there (the sender's process took over 200 ms to exit), and
    under load its exit takes 2 s. Three heartbeats lost in a row, the link's share,
    would not be excused. (The default 150 ms tolerates one lost heartbeat plus 50 ms of
    lateness: on this link it raised a suspicion in some runs. Over TCP, the same link left
    38 gaps of over 150 ms in 60 s: a lost segment stalls a sparse stream for 200 ms or
    more.)"""
    import json
    import subprocess
    import sys

    from resilient_ep.config import DetectorConfig
    from resilient_ep.liveness.datagrams import BeaconReceiver
    from resilient_ep.liveness.detector import FailureDetector

    for node in (0, 1):
        netbed.impair(node, delay_ms=LINK_DELAY_S * 1000, loss=0.01)
    with netbed.entered(0):
        rx = BeaconReceiver((netbed.address(0), BASE_PORT), range(4), key=b"k" * 32)
    cfg = DetectorConfig(heartbeat_interval_ms=50, heartbeat_timeout_ms=200)
    det = FailureDetector(range(4), cfg)
    assert cfg.lease_s == 0.2
    seconds = 15.0
    sender = netbed.popen(1, [sys.executable, "-c", HEARTBEATS, netbed.address(0), str(BASE_PORT),
                              netbed.address(1), str(seconds)], stdout=subprocess.PIPE, text=True)
    suspicions, heard, arrivals, last_seq = [], set(), [], {}
    try:
        end = time.monotonic() + seconds + 30
        while sender.poll() is None and time.monotonic() < end:
            now = time.monotonic()
            for rank, _pid, seq, boot, addr in rx.receive():
                arrivals.append((rank, seq, time.monotonic()))
                last_seq[rank] = max(seq, last_seq.get(rank, 0))
                if rank not in heard:
                    heard.add(rank)
                    det.reset(rank, now)
                det.heartbeat(rank, now)
                rx.grant(rank, seq, boot, addr)
            if len(heard) == 4:
                suspicions += [(s, last_seq[s.rank]) for s in det.poll(now)]
            time.sleep(0.005)
        got = json.loads(sender.communicate(timeout=30)[0])
    finally:
        sender.kill()
        rx.close()
    assert heard == {0, 1, 2, 3}
    stalls = _stalls(got["log"], arrivals)
    print(f"{len(stalls)} stall(s) of the bed's processes:",
          [(round(a, 3), round(b - a, 3)) for a, b in stalls])

    def stalled(lo, hi):
        return any(a < hi and b > lo for a, b in stalls)

    # A silence counts from the last heartbeat heard to the suspicion, and only while the
    # rank still sent: the sender's end (its process exits: 2 s under load) is not one.
    sent_after = [s for s, seq in suspicions if got["log"][s.rank][-1][0] > seq]
    unexplained = [s for s in sent_after if not stalled(s.at - s.silent_s, s.at)]
    assert unexplained == [], (unexplained, sent_after, stalls)
    # The lease at the end: granted 20 ms after each 50 ms heartbeat, held 200 ms.
    last_send = max(log[-1][1] for log in got["log"])
    assert all(got["held"]) or stalled(last_send - 0.25, last_send + 0.1), (got["held"], stalls)
    # Nearly every heartbeat earned a lease (2 % of the round trips lose one or the other).
    assert min(g / s for g, s in zip(got["granted"], got["sent"])) > 0.9, got
    assert netbed.counters()["dropped_loss"] > 0, "the link did lose packets"


@pytest.mark.netbed(link="emulated", seed=20)
def test_a_slow_lossy_link_serves_exactly(netbed, model_dir, prompts, reference):
    """The whole runtime across 20 ms RTT and 1 % loss each way (TCP for the data, its
    losses recovered by retransmission): nothing fenced, every stream equal to the
    failure-free run. (The heartbeat timeout is the CI one: on 2 shared cores a rank can be
    descheduled past the 150 ms default; the test above checks the link's own timeouts.)"""
    for node in (0, 1):
        netbed.impair(node, delay_ms=10, loss=0.01)
    c = _start(netbed, model_dir, _config(netbed))
    try:
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in recs:
            r.wait(TIMEOUT)
        _assert_equal_to_reference(recs, reference)
        assert c.failures == [] and c.status()["epoch"] == 0
        assert netbed.counters()["dropped_loss"] > 0, "the link did lose packets"
    finally:
        c.shutdown()
