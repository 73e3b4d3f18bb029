"""Four engine ranks (DP=4 + EP, the 2 cores shared): the wave-leader rank DP0 dies, and a
second rank (DP2) dies 50 ms later while the first failover is still running. Every stream
completes with its failure-free tokens; after the survivors went idle, new requests are
still answered (without DP0, another rank must wake the idle ones for the dummy passes a busy
rank's collectives need) and equal the failure-free run. One engine start.

DP0 and DP2 are not neighbours in the ring mirror of expert replicas, so every expert keeps a
live replica (DP3 holds DP0's block, DP1 holds DP2's).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import pytest

from vllm_harness import PROMPTS, Server, engine_env, stream_completion

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 600
TOKENS = 480
TOKENS_BEFORE_KILL = 16
SECOND_KILL_AFTER_S = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("vllm-dp4")
    instance = uuid.uuid4().hex[:12]
    srv = Server(tiny_model, ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                              "--max-num-seqs", "8", "--seed", "0", "--data-parallel-size", "4",
                              "--enable-expert-parallel", "--enable-resilience",
                              "--api-server-count", "1",
                              "--additional-config",
                              json.dumps({"resilience": {"instance": instance}}),
                              "--resilience-set", "detector.heartbeat_timeout_ms=5000",
                              # two deaths: a request moved to the second victim is not poison
                              "--resilience-set", "recovery.max_request_failures=0"],
                 work / "serve.log", engine_env())
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
            os.kill(pid, signal.SIGKILL)
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
    assert after["uncovered_experts"] == []
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
