"""Experts repaired while serving, on DP=4 + EP with a partial redundancy budget: one
redundant slot per rank (``placement.redundant_slots_per_rank=1``: 12 slots for 8 experts,
so four experts have a single copy and every rank's death takes one of them).

Each case starts its own server (an instance repairs one death at this budget) and compares
every stream with the same server's failure-free run:

- ``host``: the engine core of a rank is SIGKILLed mid-stream; its lost expert is copied
  from the node's host-memory backup into a survivor's slot while the survivors serve
  (``recovery.on_uncovered=wait``, the default: a token routed to it waits for the copy);
- ``disk``: the worker is SIGKILLed from inside (vLLM's default torch.compile mode), and the
  host backup of the lost expert is gone first: the repair falls back to the model files;
  each copy is held back 800 ms (fault injection), so the target's MoE passes that route a
  token to the lost expert wait for it (counted), and the outputs still match.

Two engine starts.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import psutil
import pytest

from vllm_harness import PROMPTS, Server, engine_env, stream_completion

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 600
TOKENS = 320
TOKENS_BEFORE_KILL = 24
SHADOW_TOKENS = 900
VICTIM = 1
CASES = {"host": False, "disk": True}  # case -> vLLM's default compile mode
REPAIR_DELAY_MS = 800


@pytest.fixture(params=list(CASES), scope="module")
def case(request, tmp_path_factory, tiny_model):
    name = request.param
    work = tmp_path_factory.mktemp(f"vllm-repair-{name}")
    instance = uuid.uuid4().hex[:12]
    args = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
            "--seed", "0", "--data-parallel-size", "4", "--api-server-count", "1",
            "--enable-expert-parallel", "--enable-resilience",
            "--additional-config", json.dumps({"resilience": {"instance": instance}}),
            "--resilience-set", "placement.redundant_slots_per_rank=1",
            "--resilience-set", "repair.host_backup=true",
            "--resilience-set", "detector.heartbeat_timeout_ms=5000"]
    if not CASES[name]:
        args.append("--enforce-eager")
    env = {"RESILIENT_EP_FAULT_INJECTION": "1"}
    if name == "disk":  # a slow copy: the MoE passes that need the expert must wait for it
        env["RESILIENT_EP_REPAIR_DELAY_MS"] = str(REPAIR_DELAY_MS)
    srv = Server(tiny_model, args, work / "serve.log", engine_env(extra=env))
    try:
        srv.wait_ready(SERVE_TIMEOUT_S)
        yield name, srv, instance
    finally:
        srv.stop()


def _streams(srv, kill=None, pinned=(0, 1, 2, 3), tokens=TOKENS, before_kill=TOKENS_BEFORE_KILL):
    outs = [dict() for _ in pinned]
    threads = [threading.Thread(target=stream_completion,
                                args=(srv, PROMPTS[i], tokens, outs[i], rank))
               for i, rank in enumerate(pinned)]
    for t in threads:
        t.start()
    if kill is not None:
        # Every stream mid-way: each has its first tokens, none is near its end (a stream
        # whose first token comes late must not let the others run out first).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            got = [len(o.get("tokens", ())) for o in outs]
            if min(got) >= before_kill or (min(got) >= 1 and max(got) >= tokens // 2):
                break
            if any("error" in o for o in outs):
                break
            time.sleep(0.005)
        kill()
        got = [(len(o.get("tokens", ())), o.get("error")) for o in outs]
        assert all(0 < n < tokens and e is None for n, e in got), f"streams at the kill: {got}"
    for t in threads:
        t.join(timeout=400)
    assert not any(t.is_alive() for t in threads)
    return outs


def _reap(*procs) -> None:
    """Never leave a victim's process behind (its worker may outlive its engine core)."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _assert_equal(clean, failed) -> None:
    for a, b in zip(clean, failed):
        assert "error" not in b and b.get("finish") == "length", b.get("error")
        assert b["tokens"] == a["tokens"]


def test_a_death_that_uncovers_an_expert_is_repaired_and_outputs_stay_exact(case):
    from resilient_ep.engines.vllm import faults
    from resilient_ep.repair.host_backup import HostBackup, default_root

    name, srv, instance = case
    status = json.loads(srv.get("/resilience/status")[1])
    ex = status["experts"]
    assert ex["plan"]["regular_slots_per_rank"] == 3 and ex["plan"]["repairable_deaths"] == 1
    assert sorted(ex["plan"]["replicas"]) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert ex["uncovered"] == [] and ex["unavailable"] == []
    held = {r["rank"]: r["held"] for r in ex["ranks"]}
    single = [e for e, n in enumerate(ex["plan"]["replicas"]) if n == 1]
    lost = sorted(set(held[VICTIM]) & set(single))
    assert lost, held
    backup = HostBackup(default_root(instance))
    stored = backup.experts()
    assert stored and all(v == list(range(8)) for v in stored.values()), stored  # once per node

    clean = _streams(srv)
    rank = next(r for r in status["ranks"] if r["dp_rank"] == VICTIM)
    engine, worker = psutil.Process(rank["engine_pid"]), psutil.Process(rank["pid"])
    if name == "disk":
        for layer in stored:
            for e in lost:
                (backup.root / layer / f"{e}.safetensors").unlink()
        faults.arm(instance, VICTIM, "kill", after_steps=TOKENS_BEFORE_KILL)
        failed = _streams(srv)
        assert faults.fired_at(instance, VICTIM) is not None
    else:
        failed = _streams(srv, kill=engine.kill)
    _reap(engine, worker)
    _assert_equal(clean, failed)

    deadline = time.monotonic() + 30
    while True:
        after = json.loads(srv.get("/resilience/status")[1])
        ex = after["experts"]
        if not ex["repairing"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after["epoch"] == 1
    assert ex["uncovered"] == [] and ex["repairing"] == [] and after["uncovered_experts"] == []
    assert sorted(m["expert"] for m in ex["moves"]) == lost
    assert all(m["rank"] != VICTIM for m in ex["moves"])
    source = "host" if name == "host" else "disk"
    assert ex["repair"][source]["copies"] == len(lost), ex["repair"]
    assert sum(v["copies"] for v in ex["repair"].values()) == len(lost), ex["repair"]
    assert ex["counters"].get("repair_exhausted", 0) == 0
    if name == "disk":
        assert ex["counters"].get("waits", 0) >= 1, ex["counters"]
        assert ex["counters"].get("wait_timeouts", 0) == 0, ex["counters"]
    # the lost experts now live on the survivors the moves named; new requests still match
    for m in ex["moves"]:
        target = next(r for r in ex["ranks"] if r["rank"] == m["rank"])
        assert m["expert"] in target["held"]
    again = _streams(srv, pinned=(None, None, None, None))
    assert [o.get("tokens") for o in again] == [o["tokens"] for o in clean]


@pytest.fixture(scope="module")
def shadow_server(tmp_path_factory, tiny_model):
    """DP=2, no redundant slot, four shadow slots per rank (the other rank's experts)."""
    work = tmp_path_factory.mktemp("vllm-shadows")
    instance = uuid.uuid4().hex[:12]
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--max-num-seqs", "8", "--seed", "0", "--data-parallel-size", "2",
            "--api-server-count", "1", "--enable-expert-parallel", "--enable-resilience",
            "--additional-config", json.dumps({"resilience": {"instance": instance}}),
            "--resilience-set", "placement.redundant_slots_per_rank=0",
            "--resilience-set", "shadow.enabled=true",
            "--resilience-set", "shadow.max_slots_per_rank=4",
            "--resilience-set", "detector.heartbeat_timeout_ms=5000"]
    srv = Server(tiny_model, args, work / "serve.log", engine_env())
    try:
        srv.wait_ready(SERVE_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()


def test_shadows_take_over_a_dead_ranks_experts_without_a_copy(shadow_server):
    srv = shadow_server
    status = json.loads(srv.get("/resilience/status")[1])
    ex = status["experts"]
    assert ex["plan"]["regular_slots_per_rank"] == 4 and ex["plan"]["shadow_slots_per_rank"] == 4
    assert ex["shadows"] == 8 and ex["active_shadows"] == 0  # idle while the regulars live
    assert [r["num_local_experts"] for r in status["ranks"]] == [8, 8]
    # Long streams: on 2 busy cores a client sees its tokens seconds after the engine made
    # them, so the kill (timed by what the client has) must still find the victim's
    # requests generating (CI once killed DP1 after its 320 tokens were all made).
    clean = _streams(srv, pinned=(0, 1, 0, 1), tokens=SHADOW_TOKENS)
    victim = next(r for r in status["ranks"] if r["dp_rank"] == 1)
    engine, worker = psutil.Process(victim["engine_pid"]), psutil.Process(victim["pid"])
    # Killed as soon as every stream has its first token: the API server, starved on these
    # cores, can hand the client its tokens seconds after the engine made them (CI once
    # killed DP1 after both its requests had ended engine-side, with 24 tokens at the client).
    failed = _streams(srv, kill=engine.kill, pinned=(0, 1, 0, 1), tokens=SHADOW_TOKENS,
                      before_kill=1)
    _reap(engine, worker)
    _assert_equal(clean, failed)
    after = json.loads(srv.get("/resilience/status")[1])
    ex = after["experts"]
    assert after["epoch"] == 1 and ex["uncovered"] == [] and after["uncovered_experts"] == []
    assert [f["readmitted"] for f in after["failovers"]] == [2], after["failovers"]  # running
    assert ex["moves"] == [] and ex["repair"] == {}  # a table flip, no weight copy
    assert ex["active_shadows"] == 4  # DP0's shadows of DP1's experts serve now
