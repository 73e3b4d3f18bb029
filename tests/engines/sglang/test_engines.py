"""Real SGLang on the CPU, tiny fp32 Qwen3-MoE, greedy.

Four starts: ``sglang.Engine`` at TP=1 without the plugin (``SGLANG_PLUGINS`` names another
plugin) and with it but no switch (same tokens, same processes, nothing activated); then two
``resilient-ep serve --engine sglang`` servers with SGLang's wide-EP layout (DP attention 2 +
EP 2) and ``--resilience-config``: the first answers the failure-free checks, then loses
scheduler rank 1 to SIGKILL while 6 ``openai`` streams run; the second loses rank 0 to
SIGSTOP. Every stream is compared with the same server's failure-free pass, and the moved
requests resume from their KV checkpoints (the prefix caches are flushed between the passes,
so nothing else could serve them)."""

from __future__ import annotations

import json
import signal

import pytest

from sglang_harness import (DP_ARGS, MAX_TOKENS, PROMPTS, Server, engine_env, run_engine,
                            stream_all, wait_for)

STREAM_TOKENS = 40


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sglang")


@pytest.fixture(scope="module")
def tp1_without_plugin(tiny_model, workdir):
    env = engine_env(workdir / "trace-off.jsonl", {"SGLANG_PLUGINS": "not-resilient-ep"})
    return run_engine(tiny_model, workdir / "tp1-off.json", env=env)


@pytest.fixture(scope="module")
def tp1_with_plugin(tiny_model, workdir):
    return run_engine(tiny_model, workdir / "tp1-on.json",
                      env=engine_env(workdir / "trace-on.jsonl"))


def test_without_the_switch_sglang_runs_as_without_the_plugin(tp1_without_plugin,
                                                               tp1_with_plugin, workdir):
    assert tp1_with_plugin["ids"] == tp1_without_plugin["ids"]
    assert all(len(ids) == MAX_TOKENS for ids in tp1_with_plugin["ids"])
    assert tp1_with_plugin["titles"] == tp1_without_plugin["titles"]
    assert any("scheduler" in t for t in tp1_with_plugin["titles"])
    assert not (workdir / "trace-off.jsonl").exists(), "SGLANG_PLUGINS kept ours out"
    events = [json.loads(x) for x in (workdir / "trace-on.jsonl").read_text().splitlines()]
    regs = [e for e in events if e["event"] == "register"]
    # every SGLang process loads it (launcher, scheduler, detokenizer; the scheduler loads
    # plugins before it takes its title), once each
    assert len({e["pid"] for e in regs}) >= 3 and len(regs) == len({e["pid"] for e in regs})
    assert any("detokenizer" in e["title"] for e in regs)
    assert not [e for e in events if e["event"] in ("activate", "patched")]


@pytest.fixture(scope="module")
def resilience_yaml(workdir):
    f = workdir / "resilience.yaml"
    f.write_text("resilience:\n  detector:\n    heartbeat_interval_ms: 50\n"
                 "    heartbeat_timeout_ms: 3000\n  kv_checkpoint:\n    interval_tokens: 8\n")
    return f


@pytest.fixture(scope="module")
def dp_server(tiny_model, workdir, resilience_yaml):
    s = Server(tiny_model, workdir, [*DP_ARGS, "--resilience-config", str(resilience_yaml)],
               tag="dp-kill")
    yield s
    s.stop()


def test_status_before_any_failure(dp_server):
    st = dp_server.status()
    assert st["engine"] == "sglang" and st["failover"] is True and st["epoch"] == 0
    assert [(r["rank"], r["dp_rank"], r["tp_rank"], r["state"]) for r in st["ranks"]] == [
        (0, 0, 0, "live"), (1, 1, 1, "live")]
    assert all(r["num_local_experts"] == 8 and r["pid"] == r["engine_pid"] for r in st["ranks"])
    assert st["num_experts"] == 8 and st["uncovered_experts"] == [] and st["failovers"] == []


def test_expert_parallel_gives_the_greedy_tokens_of_one_rank(dp_server, tp1_without_plugin):
    got = [dp_server.generate_ids(p) for p in PROMPTS]
    assert got == tp1_without_plugin["ids"]


def _flush(server) -> None:
    """Empty every rank's prefix cache, so that a moved request finds nothing of itself on
    the survivor but its KV checkpoint (the failure-free pass ran the same prompts)."""
    import urllib.request

    req = urllib.request.Request(f"{server.url}/flush_cache", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200


def test_sigkill_of_a_rank_mid_stream(dp_server):
    clean = stream_all(dp_server, PROMPTS, STREAM_TOKENS)
    assert all(o["error"] is None and o["finish"] == "length" for o in clean), clean
    victim = next(r for r in dp_server.status()["ranks"] if r["rank"] == 1)
    _flush(dp_server)
    failed = stream_all(dp_server, PROMPTS, STREAM_TOKENS, fail_pid=victim["pid"],
                        sig=signal.SIGKILL, after_tokens=20)
    marks = failed.pop()["failed_at_chunks"]
    assert all(0 < n < STREAM_TOKENS for n in marks), f"streams not mid-way at the kill: {marks}"
    for a, b in zip(clean, failed):
        assert b["error"] is None, b
        assert b["text"] == a["text"] and b["finish"] == "length"
    st = dp_server.status()
    assert st["epoch"] == 1
    assert [r["state"] for r in st["ranks"]] == ["live", "dead"]
    (ev,) = st["failovers"]
    # its process sentinel, or first the survivor's group reporting the lost peer
    assert ev["rank"] == 1 and ev["cause"] in ("exit", "reported") and ev["exitcode"] == -9
    assert ev["readmitted"] >= 1 and ev["first_output_monotonic"] >= ev["handled_monotonic"]
    assert st["uncovered_experts"] == [], "the mirror keeps every expert"
    survivor = next(c for c in st["counters"] if c["rank"] == 0)
    assert survivor["step_reruns"] + survivor["sync_reruns"] >= 1
    # every moved request resumed from its KV checkpoint (on the survivor's peer store),
    # none prefilled from scratch
    restores = survivor["kv"]["restores"]
    assert len(restores) == ev["readmitted"]
    assert all(0 < r["restored"] < r["tokens"] and r["source"] == "peer:0"
               for r in restores), json.dumps(restores)
    # new requests go to the survivor, and are still the failure-free tokens
    again = stream_all(dp_server, PROMPTS[:2], STREAM_TOKENS)
    assert [o["text"] for o in again] == [o["text"] for o in clean[:2]]
    assert dp_server.status()["in_flight"] == [0, 0]


@pytest.fixture(scope="module")
def hang_server(tiny_model, workdir, resilience_yaml, dp_server):
    dp_server.stop()  # one DP server at a time on 2 cores
    s = Server(tiny_model, workdir, [*DP_ARGS, "--resilience-config", str(resilience_yaml)],
               tag="dp-hang")
    yield s
    s.stop()


def test_a_frozen_rank_is_fenced_and_its_streams_continue(hang_server):
    clean = stream_all(hang_server, PROMPTS, STREAM_TOKENS)
    victim = next(r for r in hang_server.status()["ranks"] if r["rank"] == 0)
    _flush(hang_server)
    failed = stream_all(hang_server, PROMPTS, STREAM_TOKENS, fail_pid=victim["pid"],
                        sig=signal.SIGSTOP, after_tokens=20)
    failed.pop()
    assert [b["text"] for b in failed] == [a["text"] for a in clean]
    assert all(b["error"] is None for b in failed)
    st = wait_for(lambda: (s := hang_server.status())["epoch"] == 1 and s, 60, "the fence")
    (ev,) = st["failovers"]
    assert ev["rank"] == 0 and ev["cause"] == "hang" and ev["exitcode"] == -9
    assert [r["state"] for r in st["ranks"]] == ["dead", "live"]
    survivor = next(c for c in st["counters"] if c["rank"] == 1)
    assert survivor["kv"]["counters"]["restored_from_checkpoint"] == ev["readmitted"] >= 1
