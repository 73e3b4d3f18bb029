"""``resilient-ep demo``: 4 ranks serve a streaming workload, one is SIGKILLed mid-run, the
instance carries on; then the rank is taken back without a restart and serves a second wave.
Prints a per-step timeline and a summary, writes a PNG timeline, and exits 0 only if no
request was lost and every output equals the failure-free run."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from ..config import ResilienceConfig
from ..runtime.coordinator import Coordinator
from ..runtime.workload import ensure_model, prompts, reference_outputs

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: build the tiny model in the cache)")
    p.add_argument("--ranks", type=int, default=4, help="rank processes (default 4)")
    p.add_argument("--requests", type=int, default=16, help="requests in the workload")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request")
    p.add_argument("--kill-rank", type=int, default=1, help="rank to SIGKILL mid-run")
    p.add_argument("--hang", action="store_true", help="SIGSTOP the rank instead (a hang)")
    p.add_argument("--plot", default="resilient-ep-demo.png", help="PNG timeline ('' to skip)")
    p.add_argument("--resilience-config", help="YAML configuration file")
    p.add_argument("--no-rejoin", action="store_true",
                   help="do not take the failed rank back after the first wave")


def _bucket_timeline(c: Coordinator, t_start: float, bucket: float = 0.1) -> list[str]:
    """One line per time bucket: tokens each rank produced, and what happened."""
    if not c.steps:
        return []
    end = max(s["t1"] for s in c.steps)
    n = int((end - t_start) / bucket) + 1
    tokens = [[0] * c.num_ranks for _ in range(n)]
    for s in c.steps:
        i = int((s["t1"] - t_start) / bucket)
        if 0 <= i < n:
            tokens[i][s["rank"]] += s["num_tokens"]
    notes: dict[int, list[str]] = {}
    for f in c.failures:
        if f.injected_at:
            notes.setdefault(int((f.injected_at - t_start) / bucket), []).append(
                f"rank {f.rank} {'SIGKILL' if f.kind == 'crash' else 'SIGSTOP'}")
        notes.setdefault(int((f.detected_at - t_start) / bucket), []).append(
            f"{f.kind} detected -> epoch {f.epoch}, {f.migrated} requests migrated")
    for j in c.joins:
        notes.setdefault(int((j["t"] - t_start) / bucket), []).append(
            f"rank {j['rank']} rejoined -> epoch {j['epoch']}")
    head = "  t (s)  " + "".join(f"{'rank ' + str(r):>8s}" for r in range(c.num_ranks)) + "   events"
    lines = [head]
    idle = False
    for i in range(n):
        if not any(tokens[i]) and i not in notes:
            if not idle:
                lines.append("    ...   (idle)")
            idle = True
            continue
        idle = False
        row = f"{i * bucket:7.1f}  " + "".join(f"{v:8d}" for v in tokens[i])
        lines.append(row + ("   " + "; ".join(notes[i]) if i in notes else ""))
    return lines


def _plot(c: Coordinator, t_start: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    for r in range(c.num_ranks):
        pts = [(s["t1"] - t_start, 1000 * (s["t1"] - s["t0"])) for s in c.steps if s["rank"] == r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, ".", ms=3, label=f"rank {r}")
    for f in c.failures:
        if f.injected_at:
            ax.axvline(f.injected_at - t_start, color="red", lw=1, label=f"rank {f.rank} killed")
        ax.axvline(f.detected_at - t_start, color="orange", lw=1, ls="--", label="detected")
    for j in c.joins:
        ax.axvline(j["t"] - t_start, color="green", lw=1, label=f"rank {j['rank']} rejoined")
    ax.set_xlabel("time since start of workload (s)")
    ax.set_ylabel("step duration (ms)")
    ax.set_title("resilient-ep demo: per-step timeline of every rank")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    cfg = (ResilienceConfig.from_yaml(args.resilience_config) if args.resilience_config
           else ResilienceConfig().with_overrides(["placement.redundant_slots_per_rank=2"]))
    if not 0 <= args.kill_rank < args.ranks:
        raise ValueError(f"--kill-rank {args.kill_rank} must be in [0, {args.ranks})")
    t_all = time.time()
    model_dir = ensure_model(args.model)
    work = prompts(args.requests)
    print(f"model: {model_dir}")
    print(f"failure-free reference: the whole model in one process, {args.requests} requests x "
          f"{args.max_tokens} tokens ...", flush=True)
    reference = reference_outputs(model_dir, work, args.max_tokens)
    print(f"starting {args.ranks} ranks (placement: {cfg.placement.redundant_slots_per_rank} "
          f"redundant expert slots per rank, fault-aware) ...", flush=True)
    with Coordinator(model_dir, num_ranks=args.ranks, config=cfg) as c:
        print(f"ranks up in {time.time() - t_all:.1f} s; pids {c.pids}", flush=True)
        t_start = time.time()
        recs = [c.submit(p, args.max_tokens) for p in work]
        # Kill once about a third of the tokens have streamed.
        target = args.requests * args.max_tokens // 3
        deadline = time.monotonic() + 120
        while sum(len(r.generated) for r in recs) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        sig = signal.SIGSTOP if args.hang else signal.SIGKILL
        c.kill(args.kill_rank, sig)
        print(f"{'SIGSTOP' if args.hang else 'SIGKILL'} rank {args.kill_rank} "
              f"(pid {c.pids[args.kill_rank]}) at t={time.time() - t_start:.2f} s", flush=True)
        for r in recs:
            r.wait(180)
        wave2, join_s = [], None
        if not args.no_rejoin:
            print(f"rejoining rank {args.kill_rank}: a fresh process loads its experts while "
                  f"the others serve ...", flush=True)
            join_s = c.rejoin(args.kill_rank)
            print(f"rank {args.kill_rank} admitted after {join_s:.1f} s (epoch "
                  f"{c.status()['epoch']}); second wave of {len(work) // 2} requests", flush=True)
            wave2 = [c.submit(p, args.max_tokens) for p in work[: len(work) // 2]]
            for r in wave2:
                r.wait(180)
        t_end = time.time()
        status = c.status()
        print()
        print("per-step timeline (tokens per rank per 100 ms):")
        for line in _bucket_timeline(c, t_start):
            print(line)
        everything = recs + wave2
        completed = sum(1 for r in everything if r.finished and r.error is None)
        equal = [r.generated == ref for r, ref in zip(recs, reference)]
        equal += [r.generated == ref for r, ref in zip(wave2, reference)]
        stalls = [c.recovery_stall(f) for f in c.failures]
        print()
        print("summary")
        print(f"  requests completed        {completed}/{len(everything)}")
        print(f"  requests migrated         {sum(1 for r in recs if r.migrations)}")
        for f, s in zip(c.failures, stalls):
            det = (f.detected_at - f.injected_at) * 1000 if f.injected_at else float("nan")
            print(f"  failure                   rank {f.rank} {f.kind}: detected in {det:.0f} ms, "
                  f"stall {s * 1000:.0f} ms" if s is not None else
                  f"  failure                   rank {f.rank} {f.kind}: detected in {det:.0f} ms")
        if join_s is not None:
            served = sum(1 for r in wave2 if r.owner == args.kill_rank)
            print(f"  rejoin                    rank {args.kill_rank} admitted in {join_s:.1f} s "
                  f"(no survivor restarted), served {served} of the second wave")
        print(f"  uncovered experts         {status['uncovered_experts'] or 'none'}")
        print(f"  outputs equal to the failure-free run: {'yes' if all(equal) else 'no'}"
              f" ({sum(equal)}/{len(equal)})")
        print(f"  workload time             {t_end - t_start:.2f} s; total {t_end - t_all:.1f} s")
        if args.plot:
            _plot(c, t_start, args.plot)
            print(f"  timeline plot             {Path(args.plot).resolve()}")
        if not c.failures:
            print("  note: no failure was detected", file=sys.stderr)
    ok = completed == len(everything) and all(equal) and bool(c.failures)
    return 0 if ok else 1
