"""``resilient-ep bench rejoin --engine vllm [--json]``: a lost engine rank comes back.

DP=2 + EP on the tiny fp32 model, ``recovery.respawn=true``, one API server. The survivor
(DP0) serves a steady stream of requests throughout; the worker of DP1 is SIGKILLed; the front
end fails it over and starts a replacement at once, which loads, warms up (and compiles, with
``--compile``), verifies itself and joins. Per trial (one server start each):

- ``survivor_step_ms``: the survivor's median time per token before the kill (one decode
  step here; tokens reach the client in bursts, so this is a stream's time over its tokens);
- ``join_extra_pause_ms``: the survivor's longest inter-token gap in the window of the join
  (from the replacement's ``verifying`` to half a second after ``live``), minus one step: what
  the join costs the ranks that never stopped (target: at most one decode step);
- ``steady_window_max_gap_ms``: the same longest gap in a window of the same length just
  before the kill: what the machine's noise alone gives (the join's own cost is the
  difference);
- ``survivor_switch_ms`` / ``survivor_hello_ms``: measured in the survivor's engine core at
  the join: its switch (the worker RPC that moves the workers to the join's groups and
  rewrites the expert maps) and its hello with the joined rank on the new group;
- ``survivor_engine_pause_ms``: measured in the survivor's engine core: from the end of its
  last step before the switch to the end of its first step with the joined rank, less its
  median step (``survivor_engine_step_ms``): the join's cost to the survivor, free of the
  client's noise (the target: at most one decode step);
- ``kill_to_full_size_s``: from the kill to the replacement live (and its parts: the
  failover, the replacement's start until HELLO, warm-up, verification and the flip);
- ``served_by_new_rank``: requests pinned to the new DP1 after the join, and how many equal
  the failure-free run; ``outputs_equal``: every stream (across the kill, during the join,
  after it) equals the failure-free run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

__all__ = ["add_arguments", "run", "main"]

VICTIM = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="vllm", choices=["vllm"],
                   help="engine to measure (real vLLM, DP=2 + EP; needs resilient-ep[vllm])")
    p.add_argument("--model", help="checkpoint directory (default: the tiny model in the cache)")
    p.add_argument("--trials", type=int, default=1, help="server starts (figures: medians)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--after", type=int, default=4,
                   help="requests pinned to the new rank after its join")
    p.add_argument("--compile", action="store_true",
                   help="vLLM's default torch.compile mode (default: --enforce-eager)")
    p.add_argument("--workdir", help="where server logs go (default $TMPDIR)")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--join-timeout", type=float, default=600)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, log=print) -> dict:
    from ..runtime.workload import ensure_model

    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    model = ensure_model(args.model, quiet=args.json)
    workdir = Path(args.workdir or os.environ.get("TMPDIR", "/tmp")) / f"bench-rejoin-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    runs = [_one(args, model, workdir, str(t), log) for t in range(args.trials)]
    out = dict(runs[0])
    for k in ("survivor_step_ms", "join_extra_pause_ms", "join_window_max_gap_ms",
              "steady_window_max_gap_ms", "survivor_switch_ms", "survivor_hello_ms",
              "survivor_engine_pause_ms", "survivor_engine_step_ms",
              "kill_to_full_size_s", "kill_to_failover_s", "start_s", "warm_up_s",
              "verify_s", "flip_s", "export_s"):
        xs = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(xs) if xs else None
    out["outputs_equal"] = all(r["outputs_equal"] for r in runs)
    out["runs"] = runs
    out["setup"] = {"dp": 2, "tp": 1, "expert_parallel": True, "dtype": "float32",
                    "enforce_eager": not args.compile, "max_tokens": args.max_tokens,
                    "victim": f"DP{VICTIM} worker (SIGKILL)", "respawn": True,
                    "trials": args.trials}
    return out


def _one(args, model, workdir: Path, tag: str, log) -> dict:
    import psutil

    from .bench_failover_vllm import PROMPTS, _Server

    base = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "16",
            "--seed", "0", "--data-parallel-size", "2", "--enable-expert-parallel"]
    if not args.compile:
        base.insert(2, "--enforce-eager")
    log(f"[{tag}] starting vllm serve (DP=2, respawn on, "
        f"{'compile' if args.compile else 'eager'}) ...")
    server = _Server(model, workdir, True, f"rejoin-{tag}", args.start_timeout,
                     hang_timeout_ms=5000, base_args=base,
                     extra_args=["--resilience-set", "recovery.respawn=true"])
    n = args.max_tokens
    try:
        status = server.status()
        victim = next(r for r in status["ranks"] if r["dp_rank"] == VICTIM)
        clean = []
        for p in PROMPTS[:2]:
            o: dict = {}
            server.stream(p, n, o)
            clean.append(o["tokens"])
        done = threading.Event()
        survivor: list[dict] = []

        def load() -> None:  # the survivor serves back to back until told to stop
            i = 0
            while not done.is_set():
                o: dict = {"prompt": i % 2}
                server.stream(PROMPTS[i % 2], n, o, dp_rank=0)
                survivor.append(o)
                i += 1

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(2.0)  # steady state
        killed_at = time.monotonic()
        psutil.Process(victim["pid"]).kill()
        rec, deadline = {}, time.monotonic() + args.join_timeout
        while time.monotonic() < deadline:
            try:
                st = server.status()
            except OSError as e:  # 503: a rank did not answer the status within its 10 s
                log(f"[{tag}] status: {e}; asking again")
                time.sleep(0.5)
                continue
            rec = (st.get("rejoins") or [{}])[-1]
            if rec.get("state") in ("live", "failed"):
                break
            time.sleep(0.2)
        time.sleep(1.0)
        done.set()
        loader.join(timeout=600)
        after = []
        for i in range(args.after):
            o = {}
            server.stream(PROMPTS[i % 2], n, o, dp_rank=VICTIM)
            after.append((i % 2, o))
        st = server.status()
        failover = next((f for f in st.get("failovers", []) if f["dp_rank"] == VICTIM), {})
        switches = next((c.get("join_switches") or [] for c in st.get("counters", [])
                         if c.get("dp_rank") == 0), [])
        joined = next((c.get("join_switches") or [] for c in st.get("counters", [])
                       if c.get("dp_rank") == VICTIM), [])
    finally:
        server.stop()

    def gaps(lo: float, hi: float) -> list[float]:
        out = []
        for o in survivor:
            ts = o.get("times", [])
            out += [b - a for a, b in zip(ts, ts[1:]) if lo <= b and a <= hi]
        return out

    per_token = [(o["times"][-1] - o["times"][0]) / (len(o["times"]) - 1) for o in survivor
                 if len(o.get("times", ())) > 1 and o["times"][-1] < killed_at]
    step = statistics.median(per_token) if per_token else None  # tokens come in bursts
    live = rec.get("live_monotonic")
    window = gaps(rec["verifying_monotonic"], live + 0.5) if live else []
    worst = max(window) if window else None
    steady = gaps(killed_at - (live + 0.5 - rec["verifying_monotonic"]), killed_at) \
        if live else []
    worst_at = None
    if worst is not None:
        for o in survivor:
            ts = o.get("times", [])
            for a, b in zip(ts, ts[1:]):
                if b - a == worst and rec["verifying_monotonic"] <= b:
                    worst_at = a - rec["admitted_monotonic"]
    equal_survivor = all(o.get("tokens") == clean[o["prompt"]] and "error" not in o
                         for o in survivor)
    equal_after = [o.get("tokens") == clean[k] and "error" not in o for k, o in after]
    res = {
        "state": rec.get("state"), "error": rec.get("error"),
        "survivor_step_ms": step * 1000 if step else None,
        "join_window_max_gap_ms": worst * 1000 if worst is not None else None,
        "join_max_gap_starts_s_after_admission": worst_at,
        "steady_window_max_gap_ms": max(steady) * 1000 if steady else None,
        "survivor_switch_ms": switches[-1]["switch_ms"] if switches else None,
        "survivor_hello_ms": switches[-1]["hello_ms"] if switches else None,
        "survivor_engine_pause_ms": switches[-1].get("pause_ms") if switches else None,
        "survivor_engine_step_ms": switches[-1].get("step_ms") if switches else None,
        "survivor_switch": switches[-1] if switches else None,
        "joined_switch": joined[-1] if joined else None,
        "join_extra_pause_ms": max(0.0, (worst - step) * 1000)
        if worst is not None and step else None,
        "kill_to_full_size_s": live - killed_at if live else None,
        "kill_to_failover_s": (failover["detected_monotonic"] - killed_at)
        if failover.get("detected_monotonic") else None,
        "export_s": (rec.get("export") or {}).get("seconds"),
        "export_mib": (rec.get("export") or {}).get("bytes", 0) / 2**20,
        "start_s": (rec["warming_monotonic"] - rec["joining_monotonic"]) if live else None,
        "warm_up_s": (rec["verifying_monotonic"] - rec["warming_monotonic"]) if live else None,
        "verify_s": (rec["admitted_monotonic"] - rec["verifying_monotonic"]) if live else None,
        "flip_s": (live - rec["admitted_monotonic"]) if live else None,
        "survivor_requests": len(survivor),
        "served_by_new_rank": {"requests": len(after), "equal": sum(equal_after)},
        "verified": rec.get("verified"),
        "outputs_equal": equal_survivor and all(equal_after) and rec.get("state") == "live",
    }
    log(f"[{tag}] {rec.get('state')}: full size {res['kill_to_full_size_s']} s after the kill, "
        f"survivor step {res['survivor_step_ms']} ms, longest survivor gap in the join "
        f"window {res['join_window_max_gap_ms']} ms, outputs equal {res['outputs_equal']}")
    return res


def main(args: argparse.Namespace) -> int:
    from .bench_failover_vllm import run_logged

    res = run_logged(run, args)
    if not args.json:
        print(f"kill -> full size again   {res['kill_to_full_size_s']:.1f} s "
              f"(failover {res['kill_to_failover_s'] or 0:.2f} s, replacement start "
              f"{res['start_s'] or 0:.1f} s, warm-up {res['warm_up_s'] or 0:.1f} s)")
        print(f"survivor extra pause      {res['survivor_engine_pause_ms'] or 0:.1f} ms at the "
              f"join, in its engine (one step: {res['survivor_engine_step_ms'] or 0:.1f} ms); "
              f"client's longest gap {res['join_window_max_gap_ms'] or 0:.0f} ms in the join "
              f"window, {res['steady_window_max_gap_ms'] or 0:.0f} ms in as long a window "
              f"without one")
        print(f"served by the new rank    {res['served_by_new_rank']['equal']} / "
              f"{res['served_by_new_rank']['requests']} equal to the failure-free run")
        print(f"outputs equal             {res['outputs_equal']}")
    return 0 if res["outputs_equal"] else 1
