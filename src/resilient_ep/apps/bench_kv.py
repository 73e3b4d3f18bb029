"""``resilient-ep bench kv``: what KV checkpoints cost and what they save, all in one run.

(a) decode throughput with checkpointing on vs off: one runtime, rounds of the same workload
    alternating on/off (``Coordinator.set_kv_checkpointing``: off = every rank's checkpointer
    paused, nothing queued or copied), so machine noise hits both;
(b) restore vs full recompute for contexts of 256, 1024 and 4096 tokens, in one process, like
    with like (same model, all experts local, one thread): *restore* = find the checkpoint in the
    store (metadata, fetch, checksums), write its blocks into an empty paged cache and recompute
    the ``interval_tokens`` tokens after it (the worst lag) up to the next token's logits;
    *recompute* = prefill the whole context up to the same logits, in the exact mode
    (batch-invariant matmuls, per-row attention: what the runtime runs) and in the batched mode
    (one causal attention call, plain matmuls: faster, not bit-exact); ``speedup`` uses the faster
    of the two. The checkpoint lives in the configured store (``peer``: a store server in its own
    process, over ``ipc://``). The restored logits are checked bit-equal to the exact recompute;
(c) recomputed tokens per restored request: the runtime of (a) with rank 1 killed mid-decode;
    outputs are checked equal to the failure-free round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import ResilienceConfig
from ..runtime.coordinator import Coordinator
from ..runtime.workload import ensure_model, prompts

__all__ = ["add_arguments", "main", "run"]

CONTEXTS = (256, 1024, 4096)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the tiny model in the cache)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--requests", type=int, default=16, help="concurrent requests")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--rounds", type=int, default=4, help="on/off pairs for (a)")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)),
                   help="context lengths for (b), comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per context (median)")
    p.add_argument("--store", choices=["peer", "shm", "file"], default=None,
                   help="checkpoint store (default: kv_checkpoint.store)")
    p.add_argument("--interval-tokens", type=int, default=None,
                   help="kv_checkpoint.interval_tokens (default: the config's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--engine", default="reference", choices=["reference"],
                   help="runtime to measure")


def _config(args) -> ResilienceConfig:
    # A lenient hang timeout: on a shared, overloaded CPU a starved rank would otherwise be
    # fenced as hung (a second failure) and the run would measure hang detection, not KV restore.
    over = ["placement.redundant_slots_per_rank=2", "detector.heartbeat_timeout_ms=2000"]
    if args.store:
        over.append(f"kv_checkpoint.store={args.store}")
    if args.interval_tokens:
        over.append(f"kv_checkpoint.interval_tokens={args.interval_tokens}")
    return ResilienceConfig().with_overrides(over)


def _cpu_s(pids) -> float:
    """User + system CPU seconds of processes (Linux /proc; 0 where unreadable)."""
    import os
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _kv_cpu_s(c: Coordinator) -> float:
    kv = c.status()["kv_checkpoint"]
    return kv.get("io_cpu_s", 0.0) + kv.get("server_cpu_s", 0.0) + kv.get("hook_s", 0.0)


def _round(c: Coordinator, work, max_tokens: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    recs = [c.submit(p, max_tokens) for p in work]
    for r in recs:
        r.wait(600)
    dt = time.perf_counter() - t0
    return sum(len(r.generated) for r in recs) / dt, [r.generated for r in recs]


def _runtime_part(model_dir, cfg: ResilienceConfig, args, log) -> dict:
    work = prompts(args.requests, seed=7)
    interval = cfg.kv_checkpoint.interval_tokens
    on, off = [], []
    with Coordinator(model_dir, num_ranks=args.ranks, config=cfg) as c:
        for r in [c.submit(p, 4) for p in work]:  # warm-up
            r.wait(300)
        outputs = None
        kv_cpu0, rank_cpu_on = _kv_cpu_s(c), 0.0
        for i in range(args.rounds):
            for enabled, into in ((True, on), (False, off)) if i % 2 == 0 else ((False, off), (True, on)):
                c.set_kv_checkpointing(enabled)
                cpu0 = _cpu_s(c.pids)
                tput, outs = _round(c, work, args.max_tokens)
                if enabled:
                    rank_cpu_on += _cpu_s(c.pids) - cpu0
                into.append(tput)
                outputs = outputs or outs
            log(f"round {i + 1}: checkpointing on {on[-1]:.0f} tok/s, off {off[-1]:.0f} tok/s")
        time.sleep(0.2)  # the last steps' reports
        kv_cpu = _kv_cpu_s(c) - kv_cpu0
        # (c) a failure with checkpointing on: kill rank 1 mid-decode.
        c.set_kv_checkpointing(True)
        recs = [c.submit(p, args.max_tokens) for p in work]
        end = time.monotonic() + 120
        while min(len(r.generated) for r in recs) < min(args.max_tokens // 2, 3 * interval) \
                and time.monotonic() < end:
            time.sleep(0.002)
        c.kill(1, signal.SIGKILL)
        for r in recs:
            r.wait(600)
        status = c.status()
        moved = [r for r in recs if r.migrations]
        infos = [c.kv.requests.get(r.rid, {}) for r in moved]
        recomputed = [i["recomputed"] for i in infos if "recomputed" in i]
        restored = [i["restored"] for i in infos if "restored" in i]
        equal = [r.generated for r in recs] == outputs and all(r.error is None for r in recs)
        failures = [(f.rank, f.kind) for f in c.failures]
        degraded = sum(r.degraded for r in recs)
    log(f"failure: {failures}, {len(moved)} requests moved, recomputed tokens {recomputed}, "
        f"outputs equal: {equal}, degraded: {degraded}")
    return {"on": on, "off": off, "recomputed": recomputed, "restored": restored, "equal": equal,
            "moved": len(moved), "status": status["kv_checkpoint"], "interval": interval,
            "failures": failures, "degraded": degraded, "kv_cpu_s": kv_cpu, "rank_cpu_on_s": rank_cpu_on}


def _restore_part(model_dir, cfg: ResilienceConfig, args, log) -> dict:
    from ..kv.checkpoint import KVCheckpointer
    from ..kv.locations import StoreSpec
    from ..kv.meta import from_block_major
    from ..runtime import batch_invariant
    from ..runtime.model import AttentionBatch, MoEModel

    torch.set_num_threads(1)
    kvc = cfg.kv_checkpoint
    interval, bs = kvc.interval_tokens, 16
    exact = MoEModel.load(model_dir, linear=batch_invariant.linear, attention_mode="per_row")
    exact.experts.linear = batch_invariant.linear
    batched = MoEModel.load(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="rep-benchkv-"))
    server = None
    try:
        if kvc.store == "peer":
            ep = f"ipc://{tmp}/kvstore-1"
            server = subprocess.Popen([sys.executable, "-m", "resilient_ep.kv.peer_store", ep, "peer:1"],
                                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            if server.stdout.readline().strip() != b"ready":
                raise RuntimeError("peer store server did not start")
            spec = StoreSpec("peer", 1, peer_endpoints=(f"ipc://{tmp}/unused-0", ep))
        else:
            spec = StoreSpec(kvc.store, 1, base_dir=str(tmp / "stores"))
        out = {"restore_ms": {}, "recompute_ms_exact": {}, "recompute_ms_batched": {},
               "bit_exact": True}
        contexts = [int(x) for x in args.contexts.split(",") if x]
        for ctx_len in contexts:
            g = torch.Generator().manual_seed(ctx_len)
            tokens = torch.randint(5, 700, (ctx_len,), generator=g).tolist()
            covered = ctx_len - interval  # the checkpoint trails by the whole interval (worst case)
            nblocks = -(-ctx_len // bs) + 1

            def prefill(model, kv, table, cached, new):
                batch = AttentionBatch([table], [cached], [len(new)], bs)
                with torch.inference_mode():
                    return model.forward_step(torch.tensor(new), batch, kv)

            # The owner's cache and its checkpoint (saved through the real checkpointer).
            src = exact.make_kv_cache(nblocks, bs)
            table = src.reserve("r", ctx_len)
            prefill(exact, src, table, 0, tokens[:covered])
            saver = KVCheckpointer(0, src, kvc, spec, members={0, 1}).start()
            saver.after_step([("r", tokens, covered, table)])
            if not saver.flush(time.monotonic() + 60) or saver.errored():
                raise RuntimeError(f"checkpoint save failed: {saver.errored()}")
            saver.paused = True
            restorer = KVCheckpointer(0, src, kvc, spec, members={1} if kvc.store == "peer" else {0}).start()
            restore_t, exact_t, batched_t = [], [], []
            for _ in range(args.repeats):
                # restore: find + fetch + verify + write blocks + recompute the tail.
                dst = exact.make_kv_cache(nblocks, bs)
                t0 = time.perf_counter()
                restorer.restore("r", tokens)
                while True:
                    done = restorer.restored()
                    if done:
                        break
                    if restorer.errored():
                        raise RuntimeError(f"restore failed: {restorer.errored()}")
                    time.sleep(0.0002)
                res = done[0]
                t2 = dst.reserve("r", ctx_len)
                dst.write_blocks(t2[: res.blocks.shape[0]], from_block_major(res.blocks))
                logits_r = prefill(exact, dst, t2, res.restored_tokens, tokens[res.restored_tokens:])
                restore_t.append(time.perf_counter() - t0)
                assert res.restored_tokens == covered, (res.restored_tokens, covered)
                # full recompute, exact and batched.
                for model, into in ((exact, exact_t), (batched, batched_t)):
                    kv = model.make_kv_cache(nblocks, bs)
                    t3 = kv.reserve("r", ctx_len)
                    t0 = time.perf_counter()
                    logits = prefill(model, kv, t3, 0, tokens)
                    into.append(time.perf_counter() - t0)
                    if model is exact and not torch.equal(logits, logits_r):
                        out["bit_exact"] = False
            saver.shutdown()
            restorer.shutdown()
            key = str(ctx_len)
            out["restore_ms"][key] = statistics.median(restore_t) * 1000
            out["recompute_ms_exact"][key] = statistics.median(exact_t) * 1000
            out["recompute_ms_batched"][key] = statistics.median(batched_t) * 1000
            log(f"context {ctx_len}: restore {out['restore_ms'][key]:.1f} ms "
                f"(recompute {interval} tokens), full recompute exact "
                f"{out['recompute_ms_exact'][key]:.1f} ms, batched {out['recompute_ms_batched'][key]:.1f} ms")
        return out
    finally:
        if server is not None:
            server.kill()
            server.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, log=print) -> dict:
    model_dir = ensure_model(args.model, quiet=args.json)
    cfg = _config(args)
    if args.ranks < 2:
        raise ValueError(f"--ranks must be >= 2 (one is killed), got {args.ranks}")
    rt = _runtime_part(model_dir, cfg, args, log)
    rs = _restore_part(model_dir, cfg, args, log)
    recompute, mode, speedup = {}, {}, {}
    for k, r in rs["restore_ms"].items():
        e, b = rs["recompute_ms_exact"][k], rs["recompute_ms_batched"][k]
        recompute[k], mode[k] = (b, "batched") if b <= e else (e, "exact")
        speedup[k] = recompute[k] / r
    rec = rt["recomputed"]
    pairs = [a / b for a, b in zip(rt["on"], rt["off"])]
    return {
        "overhead_ratio": statistics.median(pairs),
        "restore_ms": rs["restore_ms"],
        "recompute_ms": recompute,
        "speedup": speedup,
        "recomputed_tokens_mean": statistics.mean(rec) if rec else float("nan"),
        "recompute_mode": mode,
        "recompute_ms_exact": rs["recompute_ms_exact"],
        "recompute_ms_batched": rs["recompute_ms_batched"],
        "restore_bit_exact": rs["bit_exact"],
        "throughput_on_tok_s": rt["on"],
        "throughput_off_tok_s": rt["off"],
        "overhead_ratio_of_medians": statistics.median(rt["on"]) / statistics.median(rt["off"]),
        "checkpoint_cpu_s": rt["kv_cpu_s"],
        "checkpoint_cpu_fraction": rt["kv_cpu_s"] / rt["rank_cpu_on_s"] if rt["rank_cpu_on_s"] else None,
        "recomputed_tokens": rec,
        "recomputed_tokens_max": max(rec) if rec else None,
        "restored_tokens": rt["restored"],
        "restored_requests": len(rec),
        "restored_outputs_equal": rt["equal"],
        "failures": rt["failures"],
        "degraded_requests": rt["degraded"],
        "kv_status_after_failure": rt["status"],
        "setup": {"ranks": args.ranks, "requests": args.requests, "max_tokens": args.max_tokens,
                  "rounds": args.rounds, "repeats": args.repeats, "store": cfg.kv_checkpoint.store,
                  "replicas": cfg.kv_checkpoint.replicas, "interval_tokens": rt["interval"],
                  "block_size": 16, "restore_tail_tokens": cfg.kv_checkpoint.interval_tokens,
                  "heartbeat_timeout_ms": cfg.detector.heartbeat_timeout_ms,
                  "throughput_method": "alternating rounds in one runtime (off = checkpointing "
                                       "paused); overhead_ratio = median of per-pair on/off ratios; "
                                       "checkpoint_cpu_fraction = CPU of the I/O threads, store "
                                       "servers and the decode-loop hook / CPU of the ranks in on rounds",
                  "restore_method": "one process, all experts local, 1 thread; restore recomputes "
                                    "interval_tokens tokens in exact mode"},
    }


def main(args: argparse.Namespace) -> int:
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    res = run(args, log=log)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"throughput ratio on/off   {res['overhead_ratio']:.3f}")
    for k in res["restore_ms"]:
        print(f"context {k:>5}             restore {res['restore_ms'][k]:8.1f} ms, recompute "
              f"{res['recompute_ms'][k]:8.1f} ms ({res['recompute_mode'][k]}): {res['speedup'][k]:.1f}x")
    print(f"recomputed tokens         mean {res['recomputed_tokens_mean']:.1f} per restored request "
          f"(max {res['recomputed_tokens_max']}, interval {res['setup']['interval_tokens']}); "
          f"outputs equal: {res['restored_outputs_equal']}")
    return 0
