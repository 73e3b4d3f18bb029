"""Every way an engine rank dies, on DP=2 + EP with ``--enable-resilience`` (the failure model
of DESIGN.md): the worker SIGKILLed (vLLM's default compile mode), the worker raising (an
injected device error), the worker frozen alone, the engine core frozen alone. Each case
starts its own server (the instance runs smaller after a death) and compares every stream
with the same server's failure-free run; the status counters show that the survivor re-ran
the interrupted step in place (no request preempted or recomputed there) and that the dead
rank's requests were restored from KV checkpoints.

Engine core SIGKILL is in ``test_engines.py``, both processes frozen in ``test_failover_hang.py``.
Four engine starts, about a minute each here.
"""

from __future__ import annotations

import json
import uuid

import psutil
import pytest

from vllm_harness import Server, engine_env, stream_all

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 480
TOKENS = 1000
HANG_TIMEOUT_MS = 3000
BLOCK = 32  # the CPU attention backend's smallest block; a checkpoint restores whole blocks
# The victim fails at its 48th step that computes tokens: each of its requests then has a
# checkpoint of at least one whole block to restore from.
TOKENS_BEFORE_KILL = 48

CASES = {
    # case: (compile mode, how the rank dies)
    "worker-sigkill": (True, "worker SIGKILL"),
    "worker-raises": (False, "worker raises"),
    "worker-sigstop": (False, "worker SIGSTOP"),
    "engine-core-sigstop": (False, "engine core SIGSTOP"),
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request, tmp_path_factory, tiny_model):
    name = request.param
    compiled, _ = CASES[name]
    work = tmp_path_factory.mktemp(f"vllm-{name}")
    instance = uuid.uuid4().hex[:12]
    args = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
            "--seed", "0", "--block-size", str(BLOCK), "--data-parallel-size", "2",
            # The failure-free pass would otherwise leave the survivor a prefix-cache hit for
            # every re-admitted request, and the restore from checkpoints would go untested.
            "--no-enable-prefix-caching",
            "--enable-expert-parallel", "--enable-resilience",
            "--additional-config", json.dumps({"resilience": {"instance": instance}}),
            "--resilience-set", f"detector.heartbeat_timeout_ms={HANG_TIMEOUT_MS}"]
    if not compiled:
        args.append("--enforce-eager")
    srv = Server(tiny_model, args, work / "serve.log",
                 engine_env(extra={"RESILIENT_EP_FAULT_INJECTION": "1"}))
    try:
        srv.wait_ready(SERVE_TIMEOUT_S)
        yield name, srv, instance
    finally:
        srv.stop()


VICTIM = 1


FAULTS = {"worker-sigkill": "kill", "worker-raises": "raise", "worker-sigstop": "stop",
          "engine-core-sigstop": "stop-engine"}


def _stream_and_fail(name: str, srv: Server, instance: str):
    """Stream every prompt, half of them pinned to each DP rank, with rank ``VICTIM`` armed
    to fail as ``name`` says at its ``TOKENS_BEFORE_KILL``-th step (``faults.py``: the
    signal or the raise comes from inside the victim's worker, timed by the engine's progress
    rather than by a client that may lag seconds behind). Returns the streams and the time
    the fault fired."""
    import threading

    from resilient_ep.engines.vllm import faults
    from vllm_harness import PROMPTS, stream_completion

    status = json.loads(srv.get("/resilience/status")[1])
    rank = next(r for r in status["ranks"] if r["dp_rank"] == VICTIM)
    engine, worker = psutil.Process(rank["engine_pid"]), psutil.Process(rank["pid"])
    assert worker in engine.children(recursive=True)
    faults.arm(instance, VICTIM, FAULTS[name], after_steps=TOKENS_BEFORE_KILL)
    outs = [dict() for _ in PROMPTS]
    threads = [threading.Thread(target=stream_completion, args=(srv, p, TOKENS, o, i % 2))
               for i, (p, o) in enumerate(zip(PROMPTS, outs))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        at = faults.fired_at(instance, VICTIM)
        assert at is not None, f"the {name} fault never fired"
        return outs, at
    finally:  # never leave a stopped process behind
        for p in (engine, worker):
            try:
                p.kill()
            except psutil.Error:
                pass


def test_rank_death_kinds_fail_over_with_kv_kept_and_restored(case):
    name, srv, instance = case
    clean, _ = stream_all(srv, TOKENS)
    failed, at = _stream_and_fail(name, srv, instance)
    victim, survivor = VICTIM, 1 - VICTIM
    for a, b in zip(clean, failed):
        assert "error" not in b and b.get("finish") == "length", (name, b.get("error"))
        assert b["tokens"] == a["tokens"], name

    after = json.loads(srv.get("/resilience/status")[1])
    [event] = after["failovers"]
    assert event["dp_rank"] == victim, event
    assert after["epoch"] == 1
    assert {r["dp_rank"]: r["state"] for r in after["ranks"]} == {survivor: "live",
                                                                  victim: "dead"}
    if name.endswith("sigstop"):  # silence, not an exit, had to be waited out
        assert event["detected_monotonic"] - at >= HANG_TIMEOUT_MS / 1000 * 0.9, event

    [counters] = after["counters"]
    assert counters["dp_rank"] == survivor
    # The survivor kept its KV: the interrupted step ran again in place, nothing preempted.
    assert counters["fallback_recoveries"] == 0, counters
    assert counters["fallback_requests_recomputed"] == 0, counters
    [worker] = counters["workers"]
    assert worker["step_reruns"] + worker["dummy_reruns"] >= 1, worker
    assert worker["reruns_exhausted"] == 0, worker
    # One epoch everywhere: the survivor's failover groups run by the front end's membership.
    assert (counters["epoch"], counters["live"]) == (1, [survivor]), counters
    assert (worker["epoch"], worker["live"]) == (1, [survivor]), worker
    # The dead rank's requests resumed from their checkpoints (whole blocks).
    kv = worker["kv"]
    assert kv["store"] == "peer", kv  # the default: another engine rank's memory
    # (each API server re-admits its own requests: the event counts this one's)
    assert 1 <= kv["loads"] <= len(failed) // 2, kv
    assert kv["external_hit_tokens"] >= BLOCK * kv["loads"], kv
    assert kv["load_errors"] == 0, kv

    # vLLM's own /metrics carries the resilience metrics beside its own. Each API server
    # answers for itself (its own re-admissions and streams): a few scrapes reach both.
    from prometheus_client.parser import text_string_to_metric_families

    def value(fams, name):
        return sum(s.value for s in fams[name].samples
                   if (s.name.endswith(("_total", "_count")) or s.name == name)
                   and s.labels.get("engine") == "vllm")

    stalls = []
    for _ in range(8):
        code, raw = srv.get("/metrics")
        assert code == 200, raw[:200]
        fams = {f.name: f for f in text_string_to_metric_families(raw.decode())}
        assert any(n.startswith("vllm:") for n in fams), "vLLM's metrics are gone"
        assert value(fams, "resilient_ep_live_ranks") == 1
        assert value(fams, "resilient_ep_membership_epoch") == 1
        assert value(fams, "resilient_ep_failovers") == 1
        assert value(fams, "resilient_ep_detection_seconds") == 1  # the fault was injected
        assert value(fams, "resilient_ep_kv_restores") == kv["loads"]
        stalls.append(value(fams, "resilient_ep_stall_seconds"))
    assert max(stalls) == 1, stalls  # a survivor's output ended the stall

    # The survivor goes on serving new requests.
    again, _ = stream_all(srv, 40)
    assert [o["tokens"] for o in again] == [o["tokens"][:40] for o in clean]
