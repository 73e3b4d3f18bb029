"""Four engine ranks (DP=4 + EP, the 2 cores shared): the wave-leader rank DP0 dies, and a
second rank (DP2) dies 50 ms later while the first failover is still running. Every stream
completes with its failure-free tokens; after the survivors went idle, new requests are
still answered (without DP0, another rank must wake the idle ones for the dummy passes a busy
rank's collectives need) and equal the failure-free run. One engine start.

The default placement on vLLM is the full mirror, in pairs (DP0, DP2) and (DP1, DP3): the first
death uncovers nothing, the second takes both copies of four experts. The survivors repair
them from the model files (no host backup here) while they serve, the copies spread over
both survivors, and the MoE passes that need them wait for them (``on_uncovered=wait``): the
outputs stay exact.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from vllm_harness import PROMPTS, Server, engine_env, signal_pid, stream_completion

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 600
TOKENS = 480
TOKENS_BEFORE_KILL = 16
SECOND_KILL_AFTER_S = 0.05
EXPORT_DELAY_MS = 1000  # per expert a survivor exports (the kill lands in the first one)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("vllm-dp4")
    marks = work / "export-marks"
    marks.mkdir()
    instance = uuid.uuid4().hex[:12]
    srv = Server(tiny_model, ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                              "--max-num-seqs", "8", "--seed", "0", "--data-parallel-size", "4",
                              "--enable-expert-parallel", "--enable-resilience",
                              "--api-server-count", "1",
                              "--additional-config",
                              json.dumps({"resilience": {"instance": instance}}),
                              "--resilience-set", "detector.heartbeat_timeout_ms=5000",
                              # two deaths: a request moved to the second victim is not poison
                              "--resilience-set", "recovery.max_request_failures=0",
                              # a replacement that hangs in its start is retried in time
                              "--resilience-set", "recovery.rejoin_start_timeout_s=120"],
                 work / "serve.log",
                 # a survivor's export for a rejoin is slowed (per expert) so that the test
                 # can kill it in the middle of one
                 engine_env(extra={"RESILIENT_EP_FAULT_INJECTION": "1",
                                   "RESILIENT_EP_EXPORT_DELAY_MS": str(EXPORT_DELAY_MS),
                                   "RESILIENT_EP_EXPORT_MARK_DIR": str(marks)}))
    srv.export_marks = marks
    try:
        srv.wait_ready(SERVE_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()


def _streams(srv, pinned: list[int | None], kills: list[int] = ()):
    outs = [dict() for _ in pinned]
    threads = [threading.Thread(target=stream_completion,
                                args=(srv, PROMPTS[i % len(PROMPTS)], TOKENS, o, rank))
               for i, (o, rank) in enumerate(zip(outs, pinned))]
    for t in threads:
        t.start()
    if kills:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(
                len(o.get("tokens", ())) >= TOKENS_BEFORE_KILL for o in outs):
            time.sleep(0.005)
        for i, pid in enumerate(kills):
            if i:
                time.sleep(SECOND_KILL_AFTER_S)
            signal_pid(pid)
        assert all(len(o.get("tokens", ())) < TOKENS for o in outs), "raise TOKENS"
    for t in threads:
        t.join(timeout=400)
    assert not any(t.is_alive() for t in threads)
    return outs


def test_wave_leader_and_a_second_rank_die_during_the_first_failover(server):
    status = json.loads(server.get("/resilience/status")[1])
    pids = {r["dp_rank"]: r["engine_pid"] for r in status["ranks"]}
    assert sorted(pids) == [0, 1, 2, 3]
    clean = _streams(server, [0, 1, 2, 3])
    failed = _streams(server, [0, 1, 2, 3], kills=[pids[0], pids[2]])
    for a, b in zip(clean, failed):
        assert "error" not in b and b.get("finish") == "length", b.get("error")
        assert b["tokens"] == a["tokens"]
    after = json.loads(server.get("/resilience/status")[1])
    assert after["epoch"] == 2
    assert sorted(e["dp_rank"] for e in after["failovers"]) == [0, 2]
    assert {r["dp_rank"]: r["state"] for r in after["ranks"]} == {
        0: "dead", 1: "live", 2: "dead", 3: "live"}
    deadline = time.monotonic() + 30
    while after["experts"]["repairing"] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = json.loads(server.get("/resilience/status")[1])
    assert after["uncovered_experts"] == []
    ex = after["experts"]
    assert ex["plan"]["replicas"] == [2] * 8 and len(ex["moves"]) == 4, ex["moves"]
    assert ex["repair"]["disk"]["copies"] == 4, ex["repair"]
    assert {m["rank"] for m in ex["moves"]} == {1, 3}  # in parallel on both survivors
    for engine in after["counters"]:  # survivors kept their KV
        assert engine["fallback_recoveries"] == 0, engine
        # one epoch everywhere: each survivor's engine-core and worker groups run by the
        # membership the front end reports (replicas of the one authority)
        assert (engine["epoch"], engine["live"]) == (2, [1, 3]), engine
        for worker in engine["workers"]:
            assert (worker["epoch"], worker["live"]) == (2, [1, 3]), worker

    time.sleep(3.0)  # every survivor idle: a new wave has to be started without DP0
    again = _streams(server, [None, None, None, None])
    assert [o.get("tokens") for o in again] == [o["tokens"] for o in clean]


REJOIN_TOKENS = 64
JOIN_TIMEOUT_S = 420
"""Above an export, two starts of 120 s (recovery.rejoin_start_timeout_s) and the checks."""


def _short(server, pinned):
    outs = [dict() for _ in pinned]
    threads = [threading.Thread(target=stream_completion,
                                args=(server, PROMPTS[i % len(PROMPTS)], REJOIN_TOKENS, o, rank))
               for i, (o, rank) in enumerate(zip(outs, pinned))]
    for t in threads:
        t.start()
    return outs, threads


def _rejoin_state(server, rank: int) -> str | None:
    st = json.loads(server.get("/resilience/status")[1])
    recs = [r for r in st.get("rejoins", []) if r["rank"] == rank]
    return recs[-1]["state"] if recs else None


def _wait_rejoin(server, rank: int, state: str) -> dict:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while time.monotonic() < deadline:
        st = json.loads(server.get("/resilience/status")[1])
        recs = [r for r in st.get("rejoins", []) if r["rank"] == rank]
        if recs and recs[-1]["state"] in (state, "failed", "live"):
            return recs[-1]
        time.sleep(0.1)
    raise AssertionError(f"DP{rank} not {state} within {JOIN_TIMEOUT_S} s: "
                         f"{recs[-1] if recs else None}\n{server.tail(12000)}")


def _assert_live(server, rec: dict) -> None:
    """A rejoin record that must be live; else its error, the whole record and the log."""
    if rec["state"] != "live":
        log = server.tail(10**9)
        at = log.rfind(f"rejoin of DP{rec['rank']} failed")
        why = log[at:at + 8000] if at >= 0 else "(no traceback in the log)"
        pytest.fail(f"DP{rec['rank']}'s rejoin {rec['state']}: {rec.get('error')}\n"
                    f"{json.dumps(rec, indent=1, default=str)}\n--- its traceback:\n{why}\n"
                    f"--- the log's end:\n{server.tail(12000)}")


def test_lost_ranks_rejoin_and_a_rank_dies_while_another_joins(server):
    """After the test above (DP0 and DP2 lost, their experts repaired onto DP1 and DP3): DP2
    rejoins; then DP0 rejoins and, while it warms up, DP1's engine core is SIGKILLed under
    load: DP0's join completes over the survivors left, DP1's requests resume on them. DP1
    rejoins, and DP3 has its worker SIGKILLed in the middle of exporting DP1's experts: what
    it did not write comes from the next source (the other survivors' exports if they hold
    it all, else the model files), and DP3 rejoins last (its experts from the survivors). The instance is back to full size, every
    replacement verified, and every stream (across the deaths, pinned to each rank
    afterwards) equals the failure-free run."""
    ref_outs, ref_threads = _short(server, [None, None, None, None])
    for t in ref_threads:
        t.join(timeout=300)
    ref = [o["tokens"] for o in ref_outs]  # exact: the same tokens on any membership
    assert all(len(r) == REJOIN_TOKENS for r in ref)

    assert server.post_empty("/resilience/ranks/2/rejoin")[0] == 202
    _assert_live(server, _wait_rejoin(server, 2, "live"))

    code, rec = server.post_empty("/resilience/ranks/0/rejoin")
    assert code == 202 and rec["state"] == "queued", rec
    assert _wait_rejoin(server, 0, "warming")["state"] == "warming"
    st = json.loads(server.get("/resilience/status")[1])
    assert {r["dp_rank"]: r["state"] for r in st["ranks"]}[0] == "warming"
    dp1 = next(r for r in st["ranks"] if r["dp_rank"] == 1)
    assert dp1["state"] == "live", (st["ranks"], server.tail(8000))
    outs, threads = _short(server, [1, 3, 2, 1])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and min(len(o.get("tokens", ())) for o in outs) < 4:
        time.sleep(0.005)
    signal_pid(dp1["engine_pid"])  # a rank dies while DP0 joins
    for t in threads:
        t.join(timeout=300)
    for i, o in enumerate(outs):
        assert "error" not in o and o["tokens"] == ref[i], o.get("error")
    rec0 = _wait_rejoin(server, 0, "live")
    _assert_live(server, rec0)

    st = json.loads(server.get("/resilience/status")[1])
    dp3 = next(r for r in st["ranks"] if r["dp_rank"] == 3)
    assert dp3["state"] == "live", (st["ranks"], server.tail(8000))
    mark = server.export_marks / "export-ep3"
    mark.unlink(missing_ok=True)  # DP3 exported for the rejoins above
    outs, threads = _short(server, [3, 0, 2, None])
    assert server.post_empty("/resilience/ranks/1/rejoin")[0] == 202
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    next_check = time.monotonic() + 2.0
    while not mark.exists() and time.monotonic() < deadline:
        if time.monotonic() > next_check:  # (a status call takes long: not every poll)
            if _rejoin_state(server, 1) not in ("queued", "exporting"):
                pytest.fail(f"DP3 exported nothing for DP1's replacement:\n{server.tail()}")
            next_check = time.monotonic() + 2.0
        time.sleep(0.002)
    signal_pid(dp3["pid"])  # DP3's worker, in the middle of its export
    for t in threads:
        t.join(timeout=300)
    for i, o in enumerate(outs):
        assert "error" not in o and o["tokens"] == ref[i], o.get("error")
    rec1 = _wait_rejoin(server, 1, "live")
    _assert_live(server, rec1)
    assert rec1["export"]["failed"] == [3], rec1["export"]
    # What DP3 did not write came from the next source: the other survivors' exports when
    # they held every expert DP1 holds, else (vLLM's loader) the model files
    loaded = rec1["verified"]["loaded"][0]
    held = sum(loaded.values())
    covered = len(rec1["export"]["experts"]) == held
    assert loaded == ({"peer": held} if covered else {"disk": held}), rec1

    assert server.post_empty("/resilience/ranks/3/rejoin")[0] == 202
    rec3 = _wait_rejoin(server, 3, "live")
    _assert_live(server, rec3)
    assert list(rec3["verified"]["loaded"][0]) == ["peer"], rec3["verified"]  # from DP1

    after = json.loads(server.get("/resilience/status")[1])
    assert {r["dp_rank"]: r["state"] for r in after["ranks"]} == {
        0: "live", 1: "live", 2: "live", 3: "live"}
    assert [j["dp_rank"] for j in after["joins"]] == [2, 0, 1, 3]
    assert after["epoch"] == rec3["epoch"] == after["joins"][-1]["epoch"]
    for r in after["rejoins"]:
        assert r["state"] == "live" and r["verified"]["experts_checked"] > 0, r
        # experts from the survivors' memory; the model files only for one that no survivor
        # held when the rejoin began (both copies were lost)
        loaded = r["verified"]["loaded"][0]
        assert set(loaded) <= {"peer", "disk"} and sum(loaded.values()) > 0, r
    assert any("peer" in r["verified"]["loaded"][0] for r in after["rejoins"])
    for engine in after["counters"]:
        assert (engine["epoch"], engine["live"]) == (after["epoch"], [0, 1, 2, 3]), engine
        for worker in engine["workers"]:
            assert worker["incarnation"] == rec3["epoch"] and not worker["solo"], worker
    deadline = time.monotonic() + 30
    while after["experts"]["repairing"] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = json.loads(server.get("/resilience/status")[1])
    assert after["uncovered_experts"] == []
    outs, threads = _short(server, [0, 1, 2, 3])
    for t in threads:
        t.join(timeout=300)
    for i, o in enumerate(outs):
        assert "error" not in o and o["tokens"] == ref[i], o.get("error")
