"""A frozen engine rank (SIGSTOP of its engine core and its worker) on DP=2 + EP with
``--enable-resilience``: the front end hears no beacon for ``heartbeat_timeout_ms``, fences the
rank (SIGKILL) and fails it over; every stream completes with its failure-free tokens.
One engine start (~60 s here)."""

from __future__ import annotations

import json
import signal

import psutil
import pytest

from vllm_harness import Server, engine_env, stream_all

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 480
TOKENS = 1000  # the engine must still be generating when the client (which can lag seconds
# behind on 2 shared cores) sees its first tokens, or the frozen rank had nothing to hand over
# Long enough that a loaded 2-core machine never starves a beacon that long; the stream
# pauses about this long when the rank freezes.
HANG_TIMEOUT_MS = 3000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("vllm-hang")
    cfg = work / "resilience.yaml"
    cfg.write_text("resilience:\n  detector:\n    heartbeat_interval_ms: 50\n"
                   f"    heartbeat_timeout_ms: {HANG_TIMEOUT_MS}\n")
    srv = Server(tiny_model, ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1100",
                              "--max-num-seqs", "8", "--seed", "0", "--data-parallel-size", "2",
                              "--enable-expert-parallel", "--resilience-config", str(cfg)],
                 work / "serve.log", engine_env())
    try:
        srv.wait_ready(SERVE_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()


def test_frozen_rank_is_fenced_and_failed_over(server):
    status = json.loads(server.get("/resilience/status")[1])
    victim = next(r for r in status["ranks"] if r["dp_rank"] == 1)
    engine = psutil.Process(victim["engine_pid"])
    workers = engine.children(recursive=True)
    assert victim["pid"] in {w.pid for w in workers}

    clean, _ = stream_all(server, TOKENS)
    try:
        frozen, stopped_at = stream_all(server, TOKENS, kill_pid=engine.pid,
                                        kill_signal=signal.SIGSTOP,
                                        also_stop=tuple(w.pid for w in workers))
    finally:  # never leave a stopped process behind, whatever happened
        for p in (engine, *workers):
            try:
                p.kill()
            except psutil.Error:
                pass
    for a, b in zip(clean, frozen):
        assert "error" not in b and b.get("finish") == "length", b
        assert b["tokens"] == a["tokens"]

    after = json.loads(server.get("/resilience/status")[1])
    [event] = after["failovers"]
    # (vLLM's default: one API server per DP rank; each re-admits its own requests, and the
    # status comes from one of them, so its count may be 0)
    assert event["dp_rank"] == 1 and event["cause"] == "hang" and event["readmitted"] >= 0
    # fenced only after the timeout: the front end waited for silence, not for an exit
    assert event["detected_monotonic"] - stopped_at >= HANG_TIMEOUT_MS / 1000 * 0.9
    assert after["epoch"] == 1
    assert {r["dp_rank"]: r["state"] for r in after["ranks"]} == {0: "live", 1: "dead"}
