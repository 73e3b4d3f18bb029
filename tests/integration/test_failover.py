"""Real rank processes, real SIGKILL / SIGSTOP: no request lost, outputs equal to the
failure-free run, nothing hangs."""

import os
import signal
import time

import pytest

from resilient_ep.config import ResilienceConfig
from resilient_ep.runtime.coordinator import Coordinator

pytestmark = pytest.mark.integration
TIMEOUT = 120
MAX_TOKENS = 24  # as in conftest.reference


def _config(*overrides):
    # Two slots of redundancy on 4 ranks x 8 experts: every expert has two replicas. A long
    # heartbeat timeout: on a loaded 2-core CI machine a healthy rank can be descheduled for
    # longer than the 150 ms default; only the hang test needs a short one.
    return ResilienceConfig().with_overrides(["placement.redundant_slots_per_rank=2",
                                              "detector.heartbeat_timeout_ms=3000", *overrides])


def _run(model_dir, prompts, *, fail_at=None, config=None, during=None):
    with Coordinator(model_dir, num_ranks=4, config=config or _config(), fail_at=fail_at) as c:
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        if during is not None:
            during(c, recs)
        for r in recs:
            r.wait(TIMEOUT)
        assert c.errored() is None
        return c, recs, c.status()


def _serve_until_repaired(c, prompts, timeout_s: float = 60):
    """Serve one wave of ``prompts`` to the end, then wait for the last weight repair."""
    wave = [c.submit(p, MAX_TOKENS) for p in prompts]
    for r in wave:
        r.wait(TIMEOUT)
    deadline = time.monotonic() + timeout_s
    while not (c.repairs and c.repairs[-1]["t1"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return wave


def _assert_nothing_lost(recs, reference):
    for r, ref in zip(recs, reference):
        assert r.error is None, f"{r.rid}: {r.error}"
        assert r.generated == ref, f"{r.rid} (migrated {r.migrations}x) differs from the failure-free run"


def test_failure_free_run_matches_single_process(model_dir, prompts, reference):
    c, recs, status = _run(model_dir, prompts)
    _assert_nothing_lost(recs, reference)
    assert status["epoch"] == 0 and all(r["state"] == "live" for r in status["ranks"])
    assert len({r.owner for r in recs}) == 4, "requests are balanced over the ranks"


@pytest.mark.parametrize("point", ["dispatch", "combine", "serve", "step_end"])
def test_sigkill_at_point(model_dir, prompts, reference, point):
    c, recs, status = _run(model_dir, prompts, fail_at={1: {"point": point, "step": 3, "signal": "KILL"}})
    _assert_nothing_lost(recs, reference)
    assert status["ranks"][1]["state"] == "dead" and status["epoch"] == 1
    assert status["uncovered_experts"] == []
    assert [f.kind for f in c.failures] == ["crash"]
    assert sum(r.migrations for r in recs) == c.failures[0].migrated > 0


def test_hung_rank_is_fenced_and_its_late_messages_ignored(model_dir, prompts, reference):
    def wake_it_later(c, recs):
        deadline = time.monotonic() + 60
        while c.status()["ranks"][2]["state"] != "fenced" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.status()["ranks"][2]["state"] == "fenced"
        os.kill(c.pids[2], signal.SIGCONT)  # the hung rank resumes and sends stale messages

    c, recs, status = _run(model_dir, prompts, fail_at={2: {"point": "combine", "step": 2, "signal": "STOP"}},
                           during=wake_it_later, config=_config("detector.heartbeat_timeout_ms=500",
                                                                "recovery.readmit_fenced=false"))
    _assert_nothing_lost(recs, reference)
    assert [f.kind for f in c.failures] == ["hang"]
    assert status["ranks"][2]["state"] == "fenced", "readmission off: it stays out"


def test_resumed_rank_is_readmitted(model_dir, prompts, reference):
    # A rank hangs (SIGSTOP), is fenced, its requests move; then it resumes (SIGCONT): it drops
    # its stale work, heartbeats again and is re-admitted with its weights still loaded.
    def wake_and_wait(c, recs):
        deadline = time.monotonic() + 60
        while c.status()["ranks"][2]["state"] != "fenced" and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(c.pids[2], signal.SIGCONT)
        while not c.joins and time.monotonic() < deadline:
            time.sleep(0.02)

    c, recs, status = _run(model_dir, prompts, fail_at={2: {"point": "combine", "step": 2, "signal": "STOP"}},
                           during=wake_and_wait, config=_config("detector.heartbeat_timeout_ms=500"))
    _assert_nothing_lost(recs, reference)
    assert [f.kind for f in c.failures] == ["hang"] and [j["rank"] for j in c.joins] == [2]
    assert status["ranks"][2]["state"] == "live" and status["epoch"] == 2


def test_two_failures_in_a_row_and_one_during_recovery(model_dir, prompts, reference):
    # Ranks 1 and 2 die at the same step (the second while the first recovery is under way);
    # then rank 3 is killed later. Mirror pairs are (0, 2) and (1, 3): rank 0 keeps a replica of
    # every expert on pair (0, 2) ... and rank 3 of pair (1, 3) until it dies too.
    def kill_third(c, recs):
        deadline = time.monotonic() + 60
        while c.status()["epoch"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        c.kill(3)

    # Three deaths: a request may be in flight at all of them (not a poison request).
    c, recs, status = _run(model_dir, prompts,
                           fail_at={1: {"point": "combine", "step": 2}, 2: {"point": "serve", "step": 2}},
                           during=kill_third, config=_config("recovery.max_request_failures=0"))
    states = [r["state"] for r in status["ranks"]]
    assert states == ["live", "dead", "dead", "dead"]
    # After three failures, rank 0 alone holds one replica of half the experts: the rest are
    # uncovered and requests that need them were served degraded, never hung or lost.
    assert status["uncovered_experts"], "rank 0 cannot hold every expert"
    for r, ref in zip(recs, reference):
        assert r.error is None and len(r.generated) == MAX_TOKENS
        if not r.degraded:
            assert r.generated == ref


def test_last_replica_lost_wait_keeps_outputs_exact(model_dir, prompts, reference):
    """The default ``recovery.on_uncovered=wait``: a token that picked an expert whose every
    replica died waits for the repair (from disk, into spare slots) and goes on: every output
    is exact."""
    cfg = _config("placement.redundant_slots_per_rank=1")
    c, recs, status = _run(model_dir, prompts, fail_at={1: {"point": "combine", "step": 2}}, config=cfg)
    lost = {e for e in range(8) if all(r == 1 for r in c.layout.replica_ranks(0, e))}
    assert lost, "with one spare slot per rank, rank 1 holds the only replica of some experts"
    assert c.repairs and c.repairs[-1]["t1"] is not None, "the lost experts were repaired"
    assert status["uncovered_experts"] == []
    _assert_nothing_lost(recs, reference)
    assert not any(r.degraded for r in recs)


def test_last_replica_lost_degrade(model_dir, prompts, reference):
    # No spare slot to repair into: the lost experts stay uncovered.
    cfg = _config("placement.redundant_slots_per_rank=0", "recovery.on_uncovered=degrade")
    c, recs, status = _run(model_dir, prompts, fail_at={1: {"point": "combine", "step": 2}}, config=cfg)
    lost = {e for e in range(8) if all(r == 1 for r in c.layout.replica_ranks(0, e))}
    assert lost, "with no redundancy rank 1 holds the only replica of some experts"
    assert {tuple(x) for x in status["uncovered_experts"]} >= {(0, e) for e in lost}
    for r, ref in zip(recs, reference):
        assert r.error is None and len(r.generated) == MAX_TOKENS, "degraded, not lost"
        if not r.degraded:
            assert r.generated == ref
    assert any(r.degraded for r in recs)


def test_last_replica_lost_fail(model_dir, prompts, reference):
    cfg = _config("placement.redundant_slots_per_rank=0", "recovery.on_uncovered=fail")
    c, recs, status = _run(model_dir, prompts, fail_at={1: {"point": "combine", "step": 2}}, config=cfg)
    failed = [r for r in recs if r.error]
    assert failed, "some request needed a lost expert"
    for r in failed:
        assert "without a live replica" in r.error and "on_uncovered=fail" in r.error
        assert len(r.generated) < MAX_TOKENS
    for r, ref in zip(recs, reference):
        if not r.error:
            assert r.generated == ref


def test_killed_rank_rejoins_without_a_restart(model_dir, prompts, reference):
    with Coordinator(model_dir, num_ranks=4, config=_config(),
                     fail_at={1: {"point": "combine", "step": 2}}) as c:
        wave1 = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in wave1:
            r.wait(TIMEOUT)
        assert c.status()["ranks"][1]["state"] == "dead"
        old_pid = c.pids[1]
        took = c.rejoin(1, timeout=TIMEOUT)
        st = c.status()
        assert took > 0 and st["epoch"] == 2 and st["ranks"][1]["state"] == "live"
        assert st["ranks"][1]["pid"] != old_pid and c.joins[0]["rank"] == 1
        others = {r: c.procs[r].pid for r in (0, 2, 3)}
        wave2 = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in wave2:
            r.wait(TIMEOUT)
        assert any(r.owner == 1 for r in wave2), "the rejoined rank serves again"
        assert {r: c.procs[r].pid for r in (0, 2, 3)} == others, "no survivor was restarted"
        _assert_nothing_lost(wave1, reference)
        _assert_nothing_lost(wave2, reference)
        # The rejoined rank holds its experts again: nothing uncovered, rank 1 in the routing.
        assert c.status()["uncovered_experts"] == []


def test_lost_experts_repaired_from_disk_without_the_rank(model_dir, prompts, reference):
    # One redundant slot per rank: some experts have a single replica. Rank 1 dies; its
    # single-replica experts are loaded from the checkpoint into survivors' spare-replica
    # slots, and the instance is exact again while rank 1 is still out.
    with Coordinator(model_dir, num_ranks=4, config=_config("placement.redundant_slots_per_rank=1"),
                     fail_at={1: {"point": "combine", "step": 2}}) as c:
        lost = {e for e in range(8) if c.layout.replica_ranks(0, e) == [1]}
        assert lost, "the test needs an expert whose only replica is on rank 1"
        wave1 = _serve_until_repaired(c, prompts)
        assert c.repairs and c.repairs[-1]["t1"], "the repair finished"
        st = c.status()
        assert st["ranks"][1]["state"] == "dead" and st["uncovered_experts"] == []
        for r in wave1:  # served, degraded at worst while the repair ran
            assert r.error is None and len(r.generated) == MAX_TOKENS
            if not r.degraded:
                assert r.generated == reference[wave1.index(r)]
        wave2 = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in wave2:
            r.wait(TIMEOUT)
        _assert_nothing_lost(wave2, reference)
        assert not any(r.degraded for r in wave2)


def test_host_backup_repairs_and_reloads_a_rejoining_rank(model_dir, prompts, reference):
    """``repair.host_backup``: the ranks put every expert once into shared memory after they
    load; rank 1's death is repaired from there (not from the model files), outputs exact
    (``wait``); the rank started again for the rejoin loads its experts from the backup too;
    the backup is gone after shutdown."""
    cfg = _config("placement.redundant_slots_per_rank=1", "repair.host_backup=true")
    with Coordinator(model_dir, num_ranks=4, config=cfg,
                     fail_at={1: {"point": "combine", "step": 2}}) as c:
        root = c.host_backup.root
        assert c.host_backup.experts() == {"0": list(range(8)), "1": list(range(8))}
        lost = {e for e in range(8) if c.layout.replica_ranks(0, e) == [1]}
        assert lost
        wave1 = _serve_until_repaired(c, prompts)
        assert c.repairs[-1]["sources"] == {"host": c.repairs[-1]["moves"]}, c.repairs
        _assert_nothing_lost(wave1, reference)
        c.rejoin(1, timeout=TIMEOUT)
        assert c.joins[-1]["loaded_from"] == "host"
        wave2 = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in wave2:
            r.wait(TIMEOUT)
        _assert_nothing_lost(wave2, reference)
        assert c.status()["uncovered_experts"] == []
    assert not root.exists()


def test_shadows_cover_a_dead_ranks_experts_by_a_table_flip(model_dir, prompts, reference):
    """No redundant slot, two shadow slots per rank: a shadow takes no token while its expert
    has a live regular copy; rank 1's death makes its experts' shadows take over with no
    weight copy and every output stays exact."""
    cfg = _config("placement.redundant_slots_per_rank=0", "shadow.enabled=true",
                  "shadow.max_slots_per_rank=2")
    with Coordinator(model_dir, num_ranks=4, config=cfg,
                     fail_at={1: {"point": "combine", "step": 2}}) as c:
        assert c.shadow_slots == 2 and c.status()["experts"]["active_shadows"] == 0
        row, mask, S = c.layout.physical_to_logical[0].tolist(), c.recovery.shadow_mask, 4
        regular = [(s // S, e) for s, e in enumerate(row) if e >= 0 and not mask[s]]
        only_on_1 = [e for r, e in regular if r == 1 and [x for x in regular if x[1] == e] == [(r, e)]]
        assert only_on_1, "rank 1 holds the only regular copy of some experts"
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in recs:
            r.wait(TIMEOUT)
        st = c.status()
        assert st["ranks"][1]["state"] == "dead" and st["uncovered_experts"] == []
        assert st["experts"]["active_shadows"] > 0 and c.repairs == []
        _assert_nothing_lost(recs, reference)
        assert not any(r.degraded for r in recs)


def test_a_poison_request_is_failed_after_max_request_failures_deaths(model_dir, prompts,
                                                                     reference):
    """A request that kills every rank it runs on (here one whose token id is past the
    embedding: a rank that runs it dies with an IndexError) costs at most
    ``recovery.max_request_failures`` ranks: then it is failed with an error that says why, the
    status records it, and the instance serves on, exactly."""
    from resilient_ep.runtime.requests import RequestRecord

    with Coordinator(model_dir, num_ranks=4, config=_config()) as c:
        with pytest.raises(ValueError, match="vocabulary"):
            c.submit([10 ** 9], 4)  # the front door refuses it ...
        poison = RequestRecord("poison", [10 ** 9], 4, None, submitted_at=time.time())
        c._call(("submit", poison))  # ... one that got past it (an engine bug) is contained
        poison.wait(TIMEOUT)
        assert poison.error and "max_request_failures=2" in poison.error, poison.error
        status = c.status()
        assert status["epoch"] == 2, "it cost two ranks, no more"
        assert sum(r["state"] == "dead" for r in status["ranks"]) == 2
        [entry] = status["poisoned_requests"]
        assert entry["rid"] == "poison" and entry["deaths"] == 2 and len(entry["ranks"]) == 2
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in recs:
            r.wait(TIMEOUT)
        assert c.errored() is None
    _assert_nothing_lost(recs, reference)


@pytest.mark.parametrize("curve_on", [False, True], ids=["tag", "curve"])
def test_forged_liveness_messages_change_nothing(model_dir, prompts, reference, curve_on):
    """Anyone on the host can reach the coordinator's liveness socket: a well-formed loss
    report ("rank 2 is dead") or beacon without the instance's key changes nothing, and the
    instance serves exactly. With the tag alone it is dropped and counted; with CURVE (the
    default) it never gets through the handshake."""
    import zmq

    from resilient_ep.liveness.beacons import alive_message, dead_message

    cfg = _config().with_overrides([f"transport.curve={str(curve_on).lower()}"])
    with Coordinator(model_dir, num_ranks=4, config=cfg) as c:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"ipc://{c.run_dir}/heartbeat")
        if not curve_on:  # the connection is up before the first send (else: zmq.Again)
            assert push.poll(10_000, zmq.POLLOUT), "the liveness socket never accepted us"
        try:
            # Forged with an explicit key: switching this process's key would also change
            # what the coordinator (same process) checks the ranks' real beacons against.
            for key in (None, b"f" * 32):
                for _ in range(50):
                    for msg in (dead_message(2, 0, key=key), alive_message(3, 1, key=key)):
                        try:  # with CURVE the forger never connects: nowhere to send
                            push.send(msg, zmq.NOBLOCK)
                        except zmq.Again:
                            pass
        finally:  # let the queued forgeries leave (linger 0 could discard them unsent)
            push.close(linger=0 if curve_on else 5000)
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        for r in recs:
            r.wait(TIMEOUT)
        if curve_on:
            assert sum(c.liveness.dropped.values()) == 0, c.liveness.dropped
        else:
            assert sum(c.liveness.dropped.values()) >= 200, c.liveness.dropped
        status = c.status()
        assert status["epoch"] == 0 and all(r["state"] == "live" for r in status["ranks"])
    _assert_nothing_lost(recs, reference)


def test_ranks_that_do_not_come_up_leave_nothing_behind(model_dir, tmp_path):
    """A start that fails (here: the ranks cannot load the model) stops every rank it
    started and closes every socket and the context before raising."""
    import shutil

    from resilient_ep.runtime.coordinator import RuntimeStartError

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    c = Coordinator(broken, num_ranks=2)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"broken")
    with pytest.raises(RuntimeStartError, match="exited"):
        c.start()
    assert all(p.poll() is not None for p in c.procs)
    assert c.ctx.closed
