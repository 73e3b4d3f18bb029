"""``resilient-ep bench failover``: what a failure costs on the reference runtime, all in one run.

(a) steady-state decode throughput with resilience on vs off (off: static membership, no
    heartbeats, no socket monitors, no KV checkpoints), runs interleaved on/off/off/on so
    machine noise hits both;
(b) crash stall: SIGKILL a rank mid-decode; time from the kill until every survivor has
    completed a step under the new epoch;
(c) hang stall: SIGSTOP a rank, the same (detection waits for the heartbeat timeout);
(d) full-restart baseline: stop every rank, start again (processes, weights), re-prefill the
    in-flight requests, time to the first new token.
Each trial is one runtime start: it takes a crash (rank 1), then a hang (rank 2), then is
restarted in full for (d), and the restarted runtime serves the next trial.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time

from ..config import ResilienceConfig
from ..runtime.coordinator import Coordinator
from ..runtime.workload import ensure_model, prompts

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the tiny model in the cache)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--trials", type=int, default=None,
                   help="failure trials (default 5; vllm/sglang: 2, each starts 3 servers)")
    p.add_argument("--requests", type=int, default=None,
                   help="concurrent requests (default 16; vllm: 4)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per request (default 64; vllm: 256)")
    p.add_argument("--throughput-runs", type=int, default=4, help="on/off pairs for (a)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--engine", default="reference", choices=["reference", "vllm", "sglang"],
                   help="runtime to measure: the reference runtime, real vLLM (needs "
                        "resilient-ep[vllm]; DP=2 + EP, SIGKILL of an engine rank) or real "
                        "SGLang (DP attention 2 + EP 2, SIGKILL of a scheduler rank)")
    p.add_argument("--workdir", help="vllm: where server logs go (default $TMPDIR)")
    p.add_argument("--start-timeout", type=float, default=600,
                   help="vllm: seconds to wait for a server to be ready")
    p.add_argument("--context", default=None, metavar="N,N,...",
                   help="vllm: also measure at these prompt lengths in tokens, e.g. "
                        "64,1024,4096 (adds one object per length to the JSON)")
    p.add_argument("--nodes", type=int, default=1,
                   help="2: ranks on two nodes of a network test bed (root; network "
                        "namespaces): a node lost, powered off, partitioned, a 20 ms RTT link "
                        "(bench_nodes.py)")
    p.add_argument("--nodes-hang-timeout-ms", type=float, default=None,
                   help="--nodes: detector.heartbeat_timeout_ms (and lease) of the failure "
                        "trials (reference runtime, default: the detector's default, 150; the "
                        "steady state always runs at it) or of every instance (vllm, default "
                        "2000: a loaded 2-core machine can starve an engine's heartbeat for a "
                        "second)")
    p.add_argument("--hang-timeout-ms", type=float, default=1000,
                   help="vllm: detector.heartbeat_timeout_ms of the servers (a frozen rank is "
                        "fenced after it; default 1000)")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def _throughput(model_dir, cfg, resilience: bool, n_req: int, max_tokens: int, ranks: int) -> float:
    with Coordinator(model_dir, num_ranks=ranks, config=cfg, resilience=resilience) as c:
        work = prompts(n_req, seed=7)
        warm = [c.submit(p, 4) for p in work]
        for r in warm:
            r.wait(120)
        t0 = time.perf_counter()
        recs = [c.submit(p, max_tokens) for p in work]
        for r in recs:
            r.wait(300)
        dt = time.perf_counter() - t0
        return sum(len(r.generated) for r in recs) / dt


def _wait_tokens(recs, n: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while sum(len(r.generated) for r in recs) < n and time.monotonic() < end:
        time.sleep(0.002)


def _wait_epoch(c: Coordinator, epoch: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while c.status()["epoch"] < epoch and time.monotonic() < end:
        time.sleep(0.002)


def _stall_after(c: Coordinator, idx: int, timeout: float = 60) -> float | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(c.failures) > idx:
            s = c.recovery_stall(c.failures[idx])
            if s is not None:
                return s
        time.sleep(0.01)
    return None


def run(args: argparse.Namespace, log=print) -> dict:
    for name, default in (("trials", 5), ("requests", 16), ("max_tokens", 64)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    model_dir = ensure_model(args.model, quiet=args.json)
    cfg = ResilienceConfig().with_overrides(["placement.redundant_slots_per_rank=2"])
    if args.ranks < 3:
        raise ValueError(f"--ranks must be >= 3 (a crash and a hang per trial), got {args.ranks}")

    # (a) throughput, interleaved on/off, the order alternating between pairs so that drift on
    # a shared machine does not favour one side.
    on, off = [], []
    for i in range(args.throughput_runs):
        for resilience in ((True, False) if i % 2 == 0 else (False, True)):
            tput = _throughput(model_dir, cfg, resilience, args.requests, args.max_tokens, args.ranks)
            (on if resilience else off).append(tput)
        log(f"throughput pair {i + 1}: on {on[-1]:.0f} tok/s, off {off[-1]:.0f} tok/s")

    # (b, c, d) failure trials.
    crash, hang, restart, detect_crash, detect_hang = [], [], [], [], []
    work = prompts(args.requests, seed=11)
    c = Coordinator(model_dir, num_ranks=args.ranks, config=cfg).start()
    try:
        for trial in range(args.trials):
            recs = [c.submit(p, args.max_tokens) for p in work]
            _wait_tokens(recs, args.requests * 4)
            c.kill(1, signal.SIGKILL)
            s = _stall_after(c, 0)
            if s is not None:
                crash.append(s)
                detect_crash.append(c.failures[0].detected_at - c.failures[0].injected_at)
            _wait_epoch(c, 1)
            _wait_tokens(recs, sum(len(r.generated) for r in recs) + args.requests * 2)
            c.kill(2, signal.SIGSTOP)
            s = _stall_after(c, 1)
            if s is not None:
                hang.append(s)
                detect_hang.append(c.failures[1].detected_at - c.failures[1].injected_at)
            log(f"trial {trial + 1}: crash stall {crash[-1] * 1000 if crash else float('nan'):.0f} ms, "
                f"hang stall {hang[-1] * 1000 if hang else float('nan'):.0f} ms")
            # (d) full restart with the in-flight requests.
            inflight = [(r.prompt + r.generated, r.max_tokens - len(r.generated)) for r in recs
                        if not r.finished and r.max_tokens > len(r.generated)]
            t0 = time.time()
            c.shutdown()
            c = Coordinator(model_dir, num_ranks=args.ranks, config=cfg).start()
            again = [c.submit(p, n) for p, n in inflight] or [c.submit(work[0], 1)]
            _wait_tokens(again, 1)
            restart.append(time.time() - t0)
            log(f"trial {trial + 1}: full restart to first new token {restart[-1]:.2f} s "
                f"({len(inflight)} requests re-prefilled)")
            for r in again:
                r.wait(300)
    finally:
        c.shutdown()
    crash_med = statistics.median(crash) if crash else float("nan")
    return {
        "overhead_ratio": statistics.median(on) / statistics.median(off),
        "throughput_on_tok_s": on,
        "throughput_off_tok_s": off,
        "crash_stall_ms_median": crash_med * 1000,
        "crash_stall_ms_p99": _pct(crash, 0.99) * 1000,
        "crash_detect_ms_median": statistics.median(detect_crash) * 1000 if detect_crash else float("nan"),
        "hang_stall_ms_median": statistics.median(hang) * 1000 if hang else float("nan"),
        "hang_stall_ms_p99": _pct(hang, 0.99) * 1000,
        "hang_detect_ms_median": statistics.median(detect_hang) * 1000 if detect_hang else float("nan"),
        "restart_s_median": statistics.median(restart) if restart else float("nan"),
        "restart_over_crash_stall": (statistics.median(restart) / crash_med) if crash and restart else float("nan"),
        "trials": args.trials,
        "setup": {"ranks": args.ranks, "requests": args.requests, "max_tokens": args.max_tokens,
                  "heartbeat_interval_ms": cfg.detector.heartbeat_interval_ms,
                  "heartbeat_timeout_ms": cfg.detector.heartbeat_timeout_ms},
        "samples": {"crash_stall_ms": [x * 1000 for x in crash], "hang_stall_ms": [x * 1000 for x in hang],
                    "restart_s": restart},
    }


def main(args: argparse.Namespace) -> int:
    if args.nodes > 1:
        if args.engine == "vllm":
            from . import bench_nodes_vllm
            return bench_nodes_vllm.main(args)
        from . import bench_nodes
        return bench_nodes.main(args)
    if args.engine == "vllm":
        from . import bench_failover_vllm as vllm_bench

        return vllm_bench.main(args)
    if args.engine == "sglang":
        from . import bench_failover_sglang as sglang_bench

        return sglang_bench.main(args)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    res = run(args, log=log)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"throughput ratio on/off   {res['overhead_ratio']:.3f}")
        print(f"crash stall               median {res['crash_stall_ms_median']:.0f} ms, "
              f"p99 {res['crash_stall_ms_p99']:.0f} ms (detected in {res['crash_detect_ms_median']:.0f} ms)")
        print(f"hang stall                median {res['hang_stall_ms_median']:.0f} ms, "
              f"p99 {res['hang_stall_ms_p99']:.0f} ms (detected in {res['hang_detect_ms_median']:.0f} ms)")
        print(f"full restart              median {res['restart_s_median']:.2f} s "
              f"({res['restart_over_crash_stall']:.0f}x the crash stall)")
    return 0
