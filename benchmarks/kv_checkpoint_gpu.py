"""Decode throughput with KV checkpointing on vs off, one process, model and paged cache on a GPU.

The tiny Qwen3-MoE (or ``--model``) decodes ``--requests`` requests for ``--steps`` steps in one
batch per step (batched attention, all experts local); with checkpointing on, a
``KVCheckpointer`` saves every request's changed blocks every ``--interval`` tokens from a side
stream into pinned host memory and on to a store (``shm`` or ``file``). Rounds alternate on/off.

    python benchmarks/kv_checkpoint_gpu.py --json     # needs CUDA; no ZeroMQ needed
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resilient_ep.config import KVCheckpointConfig  # noqa: E402
from resilient_ep.kv.checkpoint import KVCheckpointer  # noqa: E402
from resilient_ep.kv.locations import StoreSpec  # noqa: E402
from resilient_ep.runtime.model import AttentionBatch, MoEModel  # noqa: E402
from resilient_ep.runtime.model_builder import make_model  # noqa: E402


def _round(model, args, store_dir, checkpoint: bool) -> tuple[float, dict]:
    bs, dev = 16, "cuda"
    total = args.prompt + args.steps + 1
    kv = model.make_kv_cache(args.requests * (-(-total // bs)) + 1, bs)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i in range(args.requests):
        rid = f"r{i}"
        kv.reserve(rid, total)
        reqs.append({"rid": rid, "tokens": torch.randint(5, 700, (args.prompt,), generator=g).tolist()})
    ck = None
    if checkpoint:
        cfg = KVCheckpointConfig(interval_tokens=args.interval, store=args.store)
        spec = StoreSpec(args.store, 1, base_dir=str(store_dir))
        ck = KVCheckpointer(0, kv, cfg, spec, members=[0]).start()
    tables = [kv.block_table(r["rid"]) for r in reqs]
    with torch.inference_mode():
        # Prefill (not timed).
        batch = AttentionBatch(tables, [0] * len(reqs), [args.prompt] * len(reqs), bs)
        ids = torch.tensor([t for r in reqs for t in r["tokens"]], device=dev)
        nxt = model.forward_step(ids, batch, kv).argmax(-1).tolist()
        cached = args.prompt
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            for r, t in zip(reqs, nxt):
                r["tokens"].append(t)
            batch = AttentionBatch(tables, [cached] * len(reqs), [1] * len(reqs), bs)
            ids = torch.tensor(nxt, device=dev)
            nxt = model.forward_step(ids, batch, kv).argmax(-1).tolist()  # syncs (greedy on host)
            cached += 1
            if ck is not None:
                ck.after_step((r["rid"], r["tokens"], cached, tb) for r, tb in zip(reqs, tables))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    stats = {}
    if ck is not None:
        ck.flush(time.monotonic() + 60)
        stats = dict(ck.counters)
        stats["errored"] = repr(ck.errored()) if ck.errored() else None
        ck.shutdown()
    return args.requests * args.steps / dt, stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint dir (default: build the tiny model in a temp dir)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--interval", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--store", choices=["shm", "file"], default="shm")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rep-kvgpu-"))
    store_dir = Path("/dev/shm") / tmp.name if args.store == "shm" else tmp / "stores"
    try:
        model_dir = args.model or make_model(tmp / "model")
        model = MoEModel.load(model_dir, device="cuda")
        _round(model, args, store_dir, False)  # warm-up
        on, off, stats = [], [], {}
        for i in range(args.rounds):
            order = (True, False) if i % 2 == 0 else (False, True)
            for c in order:
                tput, st = _round(model, args, store_dir, c)
                (on if c else off).append(tput)
                stats = st or stats
        res = {"overhead_ratio": statistics.median(a / b for a, b in zip(on, off)),
               "throughput_on_tok_s": on, "throughput_off_tok_s": off, "last_on_round": stats,
               "device": torch.cuda.get_device_name(), "setup": vars(args)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(store_dir, ignore_errors=True)
    print(json.dumps(res) if args.json else res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
