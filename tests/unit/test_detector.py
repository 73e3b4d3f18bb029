from resilient_ep.config import DetectorConfig
from resilient_ep.liveness.detector import ALL_SILENT_FACTOR, FailureDetector


def test_crash_is_reported_once_and_at_once():
    d = FailureDetector(range(3), DetectorConfig(), now=0.0)
    d.disconnected(1, now=0.01)
    d.disconnected(1, now=0.02)
    found = d.poll(now=0.02)
    assert [(s.rank, s.kind) for s in found] == [(1, "crash")]
    assert d.poll(now=0.03) == []


def _ticks(d, start, end, step=0.01, beat=(), every=0.05):
    """Poll every ``step`` s from ``start`` to ``end``; ranks in ``beat`` heartbeat every ``every``."""
    found, t, n = [], start, 0
    while t <= end + 1e-9:
        if beat and n % round(every / step) == 0:
            for r in beat:
                d.heartbeat(r, now=t)
        found += d.poll(now=t)
        t, n = t + step, n + 1
    return found


def test_hang_after_timeout_only():
    d = FailureDetector(range(3), DetectorConfig(heartbeat_interval_ms=50, heartbeat_timeout_ms=150), now=0.0)
    assert _ticks(d, 0.0, 0.15, beat=(0, 1, 2)) == []
    # Rank 1 goes silent after t=0.15; the others keep beating.
    found = _ticks(d, 0.16, 0.29, beat=(0, 2))
    assert found == [], "silent for less than 150 ms: not yet"
    found = _ticks(d, 0.30, 0.40, beat=(0, 2))
    assert [(s.rank, s.kind) for s in found] == [(1, "hang")]
    assert 0.15 < found[0].silent_s < 0.17


def test_a_stalled_watcher_declares_no_one():
    d = FailureDetector(range(2), DetectorConfig(heartbeat_interval_ms=50, heartbeat_timeout_ms=150), now=0.0)
    assert _ticks(d, 0.0, 0.1, beat=(0, 1)) == []
    # The watcher is descheduled for 2 s: no poll, no heartbeat processed.
    assert d.poll(now=2.1) == [], "a late poll shifts deadlines instead of declaring"
    assert _ticks(d, 2.11, 2.39, beat=(0, 1)) == []
    d.heartbeat(0, now=2.4)
    d.heartbeat(1, now=2.4)
    # Every rank silent at once: not believed for ALL_SILENT_FACTOR timeouts...
    assert _ticks(d, 2.41, 2.41 + 0.15 * ALL_SILENT_FACTOR - 0.02) == []
    # ... then believed.
    assert {s.rank for s in _ticks(d, 2.41 + 0.15 * ALL_SILENT_FACTOR, 2.5 + 0.15 * ALL_SILENT_FACTOR)} == {0, 1}

def test_crash_detection_can_be_off_and_ranks_rejoin():
    d = FailureDetector(range(3), DetectorConfig(crash_detection=False), now=0.0)
    d.disconnected(0, now=0.01)
    assert _ticks(d, 0.0, 0.1, beat=(0, 1, 2)) == [], "disconnects ignored"
    assert [s.rank for s in _ticks(d, 0.11, 0.4, beat=(1, 2))] == [0], "but silence is not"
    d.reset(0, now=0.4)
    assert _ticks(d, 0.41, 0.8, beat=(0, 1, 2)) == []
    d.configure(2, members=[1, 2], now=0.8)  # rank 0 out for good: never reported again
    assert _ticks(d, 0.81, 1.5, beat=(1, 2)) == []
