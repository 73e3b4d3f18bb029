from resilient_ep.config import DetectorConfig
from resilient_ep.detector import FailureDetector


def test_crash_is_reported_once_and_at_once():
    d = FailureDetector(range(3), DetectorConfig(), now=0.0)
    d.disconnected(1, now=0.01)
    d.disconnected(1, now=0.02)
    found = d.poll(now=0.02)
    assert [(s.rank, s.kind) for s in found] == [(1, "crash")]
    assert d.poll(now=0.03) == []


def test_hang_after_timeout_only():
    d = FailureDetector(range(2), DetectorConfig(heartbeat_interval_ms=50, heartbeat_timeout_ms=150), now=0.0)
    for t in (0.05, 0.10, 0.15):
        d.heartbeat(0, now=t)
        d.heartbeat(1, now=t)
    d.heartbeat(0, now=0.20)
    assert d.poll(now=0.29) == []            # rank 1 silent for 140 ms: not yet
    found = d.poll(now=0.31)                 # 160 ms: hung
    assert [(s.rank, s.kind) for s in found] == [(1, "hang")]
    assert abs(found[0].silent_s - 0.16) < 1e-9
    assert [(s.rank, s.kind) for s in d.poll(now=1.0)] == [(0, "hang")]  # rank 0 fell silent too

def test_crash_detection_can_be_off_and_ranks_rejoin():
    d = FailureDetector(range(2), DetectorConfig(crash_detection=False), now=0.0)
    d.disconnected(0, now=0.01)
    assert d.poll(now=0.01) == []
    d.heartbeat(0, now=0.1)
    d.heartbeat(1, now=0.1)
    assert [s.rank for s in d.poll(now=0.3)] == [0, 1]
    d.reset(1, now=0.3)
    assert d.poll(now=0.35) == []
    d.configure(2, members=[0], now=0.4)     # rank 1 out for good: never reported again
    assert [s.rank for s in d.poll(now=5.0)] == [0]
