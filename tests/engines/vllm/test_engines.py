"""Real vLLM engines on the tiny fp32 Qwen3-MoE: the plugin changes nothing without its
switch, loads in every process, and TP=2+EP / DP=2+EP (resilience on) give the greedy tokens
of TP=1. Each configuration starts once (module-scoped fixtures, ~40-120 s each here)."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_harness import (PROMPTS, Server, engine_env, process_title, read_trace, run_llm,
                          stream_all)

pytestmark = pytest.mark.engine

LLM_TIMEOUT_S = 420
SERVE_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-engines")


def _llm(workdir, tiny_model, name, *, plugins=None, **kwargs):
    trace = workdir / f"{name}.trace.jsonl"
    extra = {} if plugins is None else {"VLLM_PLUGINS": plugins}
    t0 = time.monotonic()
    result = run_llm(tiny_model, workdir / f"{name}.json", workdir / f"{name}.log",
                     env=engine_env(trace, extra), timeout_s=LLM_TIMEOUT_S, **kwargs)
    result["wall_s"] = time.monotonic() - t0
    result["trace"] = read_trace(trace)
    print(f"\n[{name}] engine start {result['start_s']:.1f} s, generate "
          f"{result['generate_s']:.2f} s, process wall {result['wall_s']:.1f} s")
    return result


@pytest.fixture(scope="module")
def without_plugin(workdir, tiny_model):
    """TP=1, the plugin not loaded at all (``VLLM_PLUGINS`` names no plugin)."""
    return _llm(workdir, tiny_model, "tp1-no-plugin", plugins="")


@pytest.fixture(scope="module")
def plugin_no_switch(workdir, tiny_model):
    """TP=1, the plugin installed and loaded, resilience not turned on."""
    return _llm(workdir, tiny_model, "tp1-plugin")


@pytest.fixture(scope="module")
def tp2_ep(workdir, tiny_model):
    """TP=2 + EP, resilience on through ``LLM(additional_config=...)``."""
    return _llm(workdir, tiny_model, "tp2-ep", tensor_parallel_size=2,
                enable_expert_parallel=True, additional_config={"resilience": {}})


@pytest.fixture(scope="module")
def dp2_server(workdir, tiny_model):
    """``resilient-ep serve --engine vllm`` with DP=2 + EP, ``--enable-resilience``, a YAML file
    and one API server (the configuration where the API server owns the engines and runs the
    liveness monitor itself; vLLM's default of one API server per DP rank is tested in
    ``test_failover_api_servers.py``). The failover test at the end of this module kills one
    of its engine ranks: tests that need both ranks come first."""
    cfg = workdir / "resilience.yaml"
    # Hang detection off the critical path here: 2 cores, 3+ busy processes (a SIGKILL is
    # seen through the sockets at once).
    cfg.write_text("resilience:\n  detector:\n    heartbeat_interval_ms: 40\n"
                   "    heartbeat_timeout_ms: 10000\n")
    trace = workdir / "dp2.trace.jsonl"
    server = Server(tiny_model, ["--dtype", "float32", "--enforce-eager", "--max-model-len",
                                 "1024", "--max-num-seqs", "8", "--seed", "0",
                                 "--data-parallel-size", "2", "--enable-expert-parallel",
                                 "--api-server-count", "1",
                                 "--enable-resilience", "--resilience-config", str(cfg)],
                    workdir / "dp2.log", engine_env(trace))
    try:
        started = server.wait_ready(SERVE_TIMEOUT_S)
        print(f"\n[dp2-ep serve] ready after {started:.1f} s")
        server.trace_path = trace
        yield server
    finally:
        server.stop()


def test_plugin_absent_means_no_registration(without_plugin):
    assert without_plugin["trace"] == []


def test_without_switch_same_tokens_as_without_plugin(without_plugin, plugin_no_switch):
    assert plugin_no_switch["tokens"] == without_plugin["tokens"]
    assert len(without_plugin["tokens"]) == len(PROMPTS)
    assert len({tuple(t) for t in without_plugin["tokens"]}) == len(PROMPTS)  # not degenerate


def test_without_switch_plugin_loads_everywhere_and_does_nothing(plugin_no_switch):
    trace = plugin_no_switch["trace"]
    titles = {r["pid"]: r["title"] for r in trace}
    # front end, engine core, worker: three processes, each registered exactly once
    assert len(titles) >= 3, trace
    assert any(t.startswith("VLLM::EngineCore") for t in titles.values()), titles
    firsts = [r for r in trace if r["event"] == "register" and r["first"]]
    assert len(firsts) == len(titles)
    assert not any(r["event"] == "activate" or r["active"] or r["applied"] for r in trace)
    assert plugin_no_switch["front_end_active"] is False


def test_tp2_ep_same_tokens_as_tp1(without_plugin, tp2_ep):
    assert tp2_ep["tokens"] == without_plugin["tokens"]


PATCHES = {"vllm-cpu-moe-expert-map", "vllm-cpu-communicator-gatherv"}
FAILOVER_WORKER_PATCHES = {"vllm-dp-batch-sync", "vllm-cpu-resilient-all2all",
                           "vllm-expert-replicas"}


def _patched_by_pid(trace):
    out = {}
    for r in trace:
        if r["event"] == "patched":
            out.setdefault(r["pid"], set()).add(r["name"])
    return out


def test_tp2_ep_plugin_active_in_every_process(tp2_ep):
    trace = tp2_ep["trace"]
    pids = {r["pid"] for r in trace}
    active = {r["pid"] for r in trace if r["event"] == "activate"}
    assert len(pids) >= 4 and active == pids, trace  # front end, engine core, 2 workers
    patched = _patched_by_pid(trace)
    # the two TP workers run the MoE layers: both patches there, each applied once
    assert sum(PATCHES <= names for names in patched.values()) >= 2, patched
    assert len([r for r in trace if r["event"] == "patched"]) == sum(map(len, patched.values()))
    front_end = next(r["pid"] for r in trace if r["ppid"] not in pids)
    assert "vllm-cpu-moe-expert-map" not in patched.get(front_end, set())  # no model there


def test_dp2_ep_serve_same_tokens_as_tp1(without_plugin, dp2_server):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: both DP ranks get work
        got = list(pool.map(dp2_server.complete, PROMPTS))
    assert got == without_plugin["tokens"]


def test_dp2_status_endpoint(dp2_server):
    code, body = dp2_server.get("/resilience/status")
    assert code == 200, body
    status = json.loads(body)
    assert status["epoch"] == 0 and status["uncovered_experts"] == []
    assert status["num_experts"] == 8
    assert [r["rank"] for r in status["ranks"]] == [0, 1]
    for r in status["ranks"]:
        # each rank holds its own 4 experts and a replica of the other rank's 4
        assert r["state"] == "live" and r["num_local_experts"] == 8
        os.kill(r["pid"], 0)  # a real, running process
        assert process_title(r["pid"]) == f"VLLM::Worker_DP{r['dp_rank']}_EP{r['rank']}"
        assert process_title(r["engine_pid"]) == f"VLLM::EngineCore_DP{r['dp_rank']}"
    assert status["failovers"] == []


def test_dp2_plugin_active_in_every_serve_process(dp2_server):
    trace = read_trace(dp2_server.trace_path)
    titles = {r["pid"]: r["title"] for r in trace}
    for want in ("VLLM::EngineCore_DP0", "VLLM::EngineCore_DP1"):
        assert want in titles.values(), titles
    active = {r["pid"] for r in trace if r["event"] == "activate"}
    assert active == set(titles), titles  # launcher/API server, engine cores, workers
    assert len(titles) >= 5
    patched = _patched_by_pid(trace)
    workers = [names for names in patched.values() if PATCHES <= names]
    assert len(workers) >= 2, patched
    for names in workers:  # the failover datapath is installed where the MoE layers run
        assert FAILOVER_WORKER_PATCHES <= names, names
    for pid, title in titles.items():
        if title.startswith("VLLM::APIServer"):
            assert "vllm-cpu-moe-expert-map" not in patched.get(pid, set()), title


# ---------------------------------------------------------------- failover (kills a rank: last)
FAILOVER_TOKENS = 800  # the engine must still be generating when the client (which can lag
# seconds behind on 2 shared cores) has its first tokens


def test_dp2_sigkill_engine_rank_every_request_completes_unchanged(dp2_server):
    """Issue 4: SIGKILL one engine rank (its engine core; its worker follows) while requests
    stream. Every request completes with the tokens of the failure-free run, the dead rank's
    requests are re-admitted on the survivor, and new requests are served after it."""
    status = json.loads(dp2_server.get("/resilience/status")[1])
    victim = next(r for r in status["ranks"] if r["dp_rank"] == 1)

    clean, _ = stream_all(dp2_server, FAILOVER_TOKENS)  # same server, no failure
    assert all(o.get("finish") == "length" and len(o["tokens"]) == FAILOVER_TOKENS
               for o in clean), clean

    failed, killed_at = stream_all(dp2_server, FAILOVER_TOKENS, kill_pid=victim["engine_pid"])
    for prompt, a, b in zip(PROMPTS, clean, failed):
        assert "error" not in b, (prompt, b.get("error"))
        assert b.get("finish") == "length", (prompt, b)
        assert b["tokens"] == a["tokens"], prompt
    # every stream was live across the kill (tokens before and after it)
    assert all(o["times"][0] < killed_at < o["times"][-1] for o in failed)

    after = json.loads(dp2_server.get("/resilience/status")[1])
    assert after["epoch"] == 1
    states = {r["dp_rank"]: r["state"] for r in after["ranks"]}
    assert states == {0: "live", 1: "dead"}
    assert after["uncovered_experts"] == []  # rank 0 holds a replica of every expert
    [event] = after["failovers"]
    assert event["dp_rank"] == 1 and event["readmitted"] >= 1  # it had requests to hand over
    # the dead engine core's process is really gone (reaped by the front end, or a zombie)
    from resilient_ep.engines.vllm.status import _pid_state

    assert _pid_state(victim["engine_pid"]) == "dead"

    # new requests go to the survivor only, and are right
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(dp2_server.complete, PROMPTS))
    assert got == [a["tokens"][:len(g)] for a, g in zip(clean, got)]
    assert all(len(g) > 0 for g in got)
