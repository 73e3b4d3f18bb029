"""``resilient-ep bench repair --engine vllm [--json]``: coverage repair on real vLLM.

DP=4 + EP on the tiny fp32 model with one redundant slot per rank
(``placement.redundant_slots_per_rank=1``: 12 slots for 8 experts, four experts with a single
copy, so every rank's death leaves one expert without a live copy) and the host backup on.
One server start per arm (an instance at this budget repairs one death):

- ``mirror``: the full mirror (vLLM's default here), nothing to repair: the stall baseline;

- ``host``: the engine core of DP rank 1 is SIGKILLed mid-stream; its lost expert comes back
  from the node's host-memory backup;
- ``disk``: the same with the lost expert's backup removed first: the repair falls back to the
  model's safetensors.

Per source: copies, bytes, copy seconds and MiB/s (the repairing worker's own timing), the
time from the kill to full coverage (the last copy landed; both clocks are the machine's
monotonic clock), the longest gap a client stream saw, and whether every stream equals the
same server's failure-free run (``recovery.on_uncovered=wait``).

``memory`` compares expert memory per rank for the budgets that survive one rank death (from
the same placement code ``resilient-ep plan`` reports): the full mirror, one redundant slot
with repair, and no redundancy with shadows, on this model and at DeepSeek-V3 scale.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

__all__ = ["add_arguments", "run", "main", "memory_table"]

VICTIM = 1
DP4_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--max-num-seqs", "16", "--seed", "0", "--data-parallel-size", "4",
            "--enable-expert-parallel"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="vllm", choices=["vllm"],
                   help="engine to measure (real vLLM, DP=4 + EP; needs resilient-ep[vllm])")
    p.add_argument("--model", help="checkpoint directory (default: the tiny model in the cache)")
    p.add_argument("--sources", default="mirror,host,disk",
                   help="arms, comma-separated: host, disk (repair from there), mirror (the "
                        "full mirror, nothing to repair: the stall baseline)")
    p.add_argument("--trials", type=int, default=1,
                   help="server starts per arm (figures are medians over them)")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--workdir", help="where server logs go (default $TMPDIR)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def memory_table() -> list[dict]:
    """Expert memory per rank of budgets that survive one rank death, against the mirror."""
    from ..config import ResilienceConfig
    from ..engines.vllm.experts import ExpertPlan
    from ..placement import survival_probability

    scales = [
        # name, experts, EP ranks, bytes of one expert over all MoE layers
        ("tiny Qwen3-MoE fp32 (this bench)", 8, 4, 3 * 128 * 64 * 4 * 2),
        ("DeepSeek-V3 fp8, EP=32", 256, 32, 3 * 7168 * 2048 * 1 * 58),
    ]
    rows = []
    for name, E, N, per in scales:
        base = -(-E // N)
        configs = [("full mirror", None, 0, "none needed"),
                   ("1 redundant slot + repair", 1, 0, "repair (host backup / disk)"),
                   ("no redundancy + shadows", 0, base, "shadows (residual memory)")]
        mirror_bytes = None
        for label, redundant, shadows, how in configs:
            cfg = ResilienceConfig().with_overrides(
                [f"placement.redundant_slots_per_rank={'null' if redundant is None else redundant}"])
            plan = ExpertPlan(E, N, cfg, shadow_slots=shadows)
            regular_bytes = plan.regular * per
            shadow_bytes = plan.shadow_slots * per
            if mirror_bytes is None:
                mirror_bytes = regular_bytes
            p_now = survival_probability(plan.layout, 1).p
            rows.append({
                "model": name, "config": label, "regular_slots_per_rank": plan.regular,
                "shadow_slots_per_rank": plan.shadow_slots,
                "expert_mib_per_rank": regular_bytes / 2**20,
                "shadow_mib_per_rank": shadow_bytes / 2**20,
                "vs_mirror": regular_bytes / mirror_bytes,
                "p_covered_after_one_death": p_now,
                "p_covered_after_repair": 1.0 if plan.describe()["repairable_deaths"] >= 1 else p_now,
                "coverage_by": how})
    return rows


def run(args: argparse.Namespace, log=print) -> dict:
    from ..runtime.workload import ensure_model

    model = ensure_model(args.model, quiet=args.json)
    workdir = Path(args.workdir or os.environ.get("TMPDIR", "/tmp")) / f"bench-repair-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    for s in sources:
        if s not in ("host", "disk", "mirror"):
            raise ValueError(f"--sources: {s!r} is not one of mirror, host, disk")
    out: dict = {"engine": "vllm", "sources": {}, "memory": memory_table(),
                 "setup": {"dp": 4, "tp": 1, "expert_parallel": True, "experts": 8,
                           "redundant_slots_per_rank": 1, "requests": args.requests,
                           "max_tokens": args.max_tokens, "dtype": "float32",
                           "enforce_eager": True, "on_uncovered": "wait"}}
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    per: dict[str, list[dict]] = {s: [] for s in sources}
    for trial in range(args.trials):
        for source in sources:
            per[source].append(_one(args, model, workdir, source, f"{trial}", log))
    for source, runs in per.items():
        out["sources"][source] = _median_of(runs)
    out["outputs_equal"] = all(r["outputs_equal"] for rs in per.values() for r in rs)
    base = out["sources"].get("mirror", {}).get("stall_ms")
    if base:  # side by side in one run: what repairing (instead of holding a mirror) costs
        out["stall_vs_mirror"] = {k: r["stall_ms"] / base for k, r in out["sources"].items()
                                  if k != "mirror"}
    out["setup"]["trials"] = args.trials
    return out


def _median_of(runs: list[dict]) -> dict:
    """The first run's record with the numeric figures replaced by their medians over the
    runs (each run's figures kept under ``runs``)."""
    import statistics

    out = dict(runs[0])
    for k in ("bytes", "copy_s", "mib_per_s", "death_to_full_coverage_s", "stall_ms"):
        xs = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median(xs) if xs else None
    out["outputs_equal"] = all(r["outputs_equal"] for r in runs)
    out["runs"] = runs
    return out


def _one(args, model, workdir, source: str, tag: str, log) -> dict:
    """One server start of one arm: kill DP rank 1 mid-stream, measure the repair."""
    import psutil

    from ..repair.host_backup import HostBackup
    from .bench_failover_vllm import _Server, _stall_s, _streams

    budget = [] if source == "mirror" else [
        "--resilience-set", "placement.redundant_slots_per_rank=1"]
    log(f"[{source}] starting vllm serve (DP=4, "
        f"{'the full mirror' if source == 'mirror' else '1 redundant slot per rank'}) ...")
    server = _Server(model, workdir, True, f"repair-{source}-{tag}", args.start_timeout,
                     hang_timeout_ms=5000, base_args=DP4_ARGS,
                     extra_args=[*budget, "--resilience-set", "repair.host_backup=true"])
    try:
        status = server.status()
        ex = status["experts"]
        single = [e for e, n in enumerate(ex["plan"]["replicas"]) if n == 1]
        held = {r["rank"]: r["held"] for r in ex["ranks"]}
        lost = sorted(set(held[VICTIM]) & set(single))
        backup = HostBackup(ex["ranks"][0]["host_backup"])  # the node's backup
        if source == "disk":
            for layer in backup.experts():
                for e in lost:
                    (backup.root / layer / f"{e}.safetensors").unlink(missing_ok=True)
        victim = next(r for r in status["ranks"] if r["dp_rank"] == VICTIM)
        workers = psutil.Process(victim["engine_pid"]).children(recursive=True)
        clean, _ = _streams(server, args.requests, args.max_tokens)
        failed, killed_at = _streams(server, args.requests, args.max_tokens,
                                     kill_pid=victim["engine_pid"])
        for w in workers:
            try:
                w.kill()
            except psutil.Error:
                pass
        deadline = time.monotonic() + 60
        while True:
            after = server.status()
            if not after["experts"]["repairing"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ex = after["experts"]
        copies = ex["copies"]
        landed = max((c["finished_monotonic"] for c in copies), default=None)
        stats = ex["repair"].get(source, {})
        res = {
            "lost_experts": lost, "moves": ex["moves"], "copies": len(copies),
            "sources_used": sorted({c["source"] for c in copies}),
            "bytes": stats.get("bytes"), "copy_s": stats.get("seconds"),
            "mib_per_s": stats.get("mib_per_s"),
            "death_to_full_coverage_s": (landed - killed_at) if landed else (
                0.0 if not lost else None),
            "uncovered_after": ex["uncovered"] + ex["repairing"],
            "stall_ms": _stall_s(failed, killed_at) * 1000,
            "outputs_equal": all(a.get("tokens") == b.get("tokens") and "error" not in b
                                 for a, b in zip(clean, failed)),
            "waits": ex["counters"].get("waits", 0),
            "wait_timeouts": ex["counters"].get("wait_timeouts", 0),
            "failover": (after.get("failovers") or [None])[0],
        }
        log(f"[{source}] lost {lost}, full coverage {res['death_to_full_coverage_s']} s "
            f"after the death, from {res['sources_used']}, {res['mib_per_s'] or 0:.0f} "
            f"MiB/s, stall {res['stall_ms']:.0f} ms, outputs equal {res['outputs_equal']}")
        return res
    finally:
        server.stop()


def main(args: argparse.Namespace) -> int:
    from .bench_failover_vllm import run_logged

    res = run_logged(run, args)
    if not args.json:
        for source, r in res["sources"].items():
            print(f"{source:6s} full coverage {r['death_to_full_coverage_s']} s after the "
                  f"death, {r['mib_per_s'] or 0:.0f} MiB/s, stall {r['stall_ms']:.0f} ms, "
                  f"outputs equal {r['outputs_equal']}")
        for m in res["memory"]:
            print(f"{m['model']:34s} {m['config']:27s} {m['expert_mib_per_rank']:10.1f} MiB/rank "
                  f"({m['vs_mirror']:.2f}x mirror) + {m['shadow_mib_per_rank']:.1f} MiB shadows; "
                  f"P(covered) {m['p_covered_after_one_death']:.2f} -> "
                  f"{m['p_covered_after_repair']:.2f}")
    return 0 if res["outputs_equal"] else 1
