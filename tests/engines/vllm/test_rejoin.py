"""A lost engine rank comes back without a restart (DP=2 + EP, vLLM's default torch.compile
mode, ``recovery.respawn=true``).

The worker of DP1 (the process that holds the accelerator, the one that dies most often) is
SIGKILLed at a seeded random point of its streams. The front end fails DP1 over, starts a
replacement engine core at once, and the replacement loads, compiles and warms up alone,
verifies its weights against the survivor's and the model files, and is admitted with one
epoch. All the while DP0 serves a stream of requests; at the join it switches groups at one
step boundary (no restart, no recompile, no step re-run). The replacement hears of its own
admission late (fault injection, ``RESILIENT_EP_JOIN_WAKE_DELAY_MS``) while short streams
for DP1 keep arriving: the front end routes them to it from its admission on, before its
flip; it must not run them on its solo groups (they would miss the survivor's experts). Every stream, before,
across the kill, during the join and pinned to the new DP1 afterwards, equals the
failure-free run. One engine start.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid

import psutil
import pytest

from vllm_harness import PROMPTS, Server, engine_env, stream_completion

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 900
JOIN_TIMEOUT_S = 400
TOKENS = 400  # long enough that the kill (timed by what the client has) finds DP1 busy
SEED = 1203
WAKE_DELAY_MS = 3000  # the replacement hears of its admission this late
PROBE_TOKENS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("vllm-rejoin")
    instance = uuid.uuid4().hex[:12]
    args = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
            "--seed", "0", "--data-parallel-size", "2", "--api-server-count", "1",
            "--enable-expert-parallel", "--enable-resilience",
            "--additional-config", json.dumps({"resilience": {"instance": instance}}),
            "--resilience-set", "recovery.respawn=true",
            "--resilience-set", "detector.heartbeat_timeout_ms=5000",
            # a replacement that hangs in its start is retried in time
            "--resilience-set", "recovery.rejoin_start_timeout_s=180"]
    srv = Server(tiny_model, args, work / "serve.log", engine_env(extra={
        "RESILIENT_EP_FAULT_INJECTION": "1", "RESILIENT_EP_JOIN_WAKE_DELAY_MS": str(WAKE_DELAY_MS)}))
    try:
        srv.wait_ready(SERVE_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()


def _start(srv, pinned):
    outs = [dict() for _ in pinned]
    threads = [threading.Thread(target=stream_completion,
                                args=(srv, PROMPTS[i], TOKENS, outs[i], rank))
               for i, rank in enumerate(pinned)]
    for t in threads:
        t.start()
    return outs, threads


def _join(threads) -> None:
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)


def _status(srv) -> dict:
    code, body = srv.get("/resilience/status")
    assert code == 200, body
    return json.loads(body)


def _reruns(status: dict) -> int:
    return sum(w.get("step_reruns", 0) for c in status["counters"] for w in c.get("workers", []))


def test_a_killed_worker_respawns_and_rejoins_while_the_survivor_serves(server):
    srv = server
    before = _status(srv)
    ranks = {r["dp_rank"]: r for r in before["ranks"]}
    assert before["rejoins"] == [] and before["joins"] == []
    outs, threads = _start(srv, (0, 1, 0, 1))
    _join(threads)
    clean = [o["tokens"] for o in outs]
    assert all(len(c) == TOKENS for c in clean)

    # the kill, at a random point of the streams
    at = random.Random(SEED).randint(4, TOKENS // 4)
    outs, threads = _start(srv, (0, 1, 0, 1))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and min(len(o.get("tokens", ())) for o in outs) < at:
        time.sleep(0.005)
    victim = psutil.Process(ranks[1]["pid"])
    victim.kill()
    _join(threads)
    for o, c in zip(outs, clean):
        assert "error" not in o and o["tokens"] == c, o.get("error")
    lost = [f for f in _status(srv)["failovers"] if f["dp_rank"] == 1]
    assert [f["readmitted"] for f in lost] == [2], lost  # the kill found DP1's two running
    reruns_before = _reruns(_status(srv))  # the survivor's, after the kill's re-run

    # the replacement warms up while DP0 serves; every request meanwhile is exact
    done, bad, served = threading.Event(), [], []

    def load() -> None:
        while not done.is_set():
            o, t = _start(srv, (0, 0))
            _join(t)
            served.append(len(o))
            bad.extend((i, x.get("error"), len(x.get("tokens") or ()))
                       for i, x in enumerate(o) if x.get("tokens") != clean[i])

    probes: list[tuple[int, dict, threading.Thread]] = []

    def probe() -> None:
        """A short stream for DP1 every 0.25 s, each in its own thread (one still running on
        DP0 while it waits for the join's hello must not hold the next back): sent to DP0
        while DP1 is out, to the replacement from its admission on."""
        k = 0
        while not done.is_set():
            i, o = k % 4, {}
            k += 1
            t = threading.Thread(target=stream_completion,
                                 args=(srv, PROMPTS[i], PROBE_TOKENS, o, 1))
            t.start()
            probes.append((i, o, t))
            done.wait(0.25)

    loader = threading.Thread(target=load)
    prober = threading.Thread(target=probe)
    loader.start()
    prober.start()
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        states = []
        while time.monotonic() < deadline:
            st = _status(srv)
            rec = (st.get("rejoins") or [{}])[-1]
            if rec.get("state") and (not states or states[-1] != rec["state"]):
                states.append(rec["state"])
            if rec.get("state") in ("live", "failed"):
                break
            time.sleep(0.2)
        time.sleep(2)  # the survivor serves on, now next to the replacement
    finally:
        done.set()
        loader.join(timeout=300)
        prober.join(timeout=300)
        for i, o, t in probes:
            t.join(timeout=300)
            served.append(1)
            if o.get("tokens") != clean[i][:PROBE_TOKENS]:
                bad.append(("probe", i, o.get("error"), o.get("tokens")))
    assert not any(t.is_alive() for _, _, t in probes)
    assert rec.get("state") == "live", (rec, srv.tail())
    assert rec["reason"] == "respawn" and rec["epoch"] == 2
    assert states[-1] == "live" and "warming" in states, states
    assert rec["verified"]["compared_with"] == 0 and rec["verified"]["experts_checked"] > 0
    # its experts came from the survivor's memory (exported for it), none from the files
    assert rec["export"]["failed"] == [] and rec["export"]["bytes"] > 0, rec["export"]
    held = len(rec["export"]["experts"])
    assert held > 0 and rec["verified"]["loaded"] == [{"peer": held}], rec["verified"]
    # its probe forward equals the survivor's: every weighted module (2 layers x 7, embedding,
    # final norm, LM head) and every expert it holds, which DP0 (full mirror) computed from
    # its own slots
    probe = rec["verified"]["probe"]
    assert probe["dense_modules"] == 17 and probe["experts_not_compared"] == 0, probe
    assert probe["experts_compared"] == 2 * held == probe["survivor_sources"]["slot"], probe
    assert not bad and served, bad

    after = _status(srv)
    assert after["epoch"] == 2 and [j["dp_rank"] for j in after["joins"]] == [1]
    # the race was there: requests reached the replacement before its join's news did
    early = {c["dp_rank"]: c.get("requests_before_join") for c in after["counters"]}
    assert early[1] and early[1]["held"] + early[1]["flipped_by_request"] >= 1, early
    assert early[0] == {"held": 0, "flipped_by_request": 0}, early
    new = {r["dp_rank"]: r for r in after["ranks"]}
    assert [new[d]["state"] for d in (0, 1)] == ["live", "live"]
    assert (new[0]["pid"], new[0]["engine_pid"]) == (ranks[0]["pid"], ranks[0]["engine_pid"])
    assert new[1]["pid"] != ranks[1]["pid"] and new[1]["engine_pid"] == rec["pid"]
    assert _reruns(after) == reruns_before  # the join cost the survivor no step re-run
    workers = [w for c in after["counters"] for w in c.get("workers", [])]
    assert sorted(w["live"] == [0, 1] for w in workers) == [True, True]
    assert all(w["incarnation"] == 2 and not w["solo"] for w in workers), workers

    # the new rank serves: pinned to it, and balanced over both
    outs, threads = _start(srv, (1, 1, None, None))
    _join(threads)
    for o, c in zip(outs, clean):
        assert "error" not in o and o["tokens"] == c, o.get("error")


def test_rejoin_of_a_live_rank_or_a_bad_one_is_refused(server):
    post = server.post_empty
    assert post("/resilience/ranks/1/rejoin") == (409, {"error": "rank 1 is live: nothing to "
                                                                 "rejoin", "rank": 1})
    code, body = post("/resilience/ranks/7/rejoin")
    assert code == 409 and "not a DP rank" in body["error"]
    code, body = post("/resilience/ranks/x/rejoin")
    assert code == 400 and "'x'" in body["error"]
    assert server.get("/resilience/ranks/1/rejoin")[0] == 405
