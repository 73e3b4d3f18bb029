"""GPU timings of an expert repair's pieces (run on a CUDA machine; prints one JSON object).

    PYTHONPATH=src python benchmarks/gpu_repair_copy.py [--out FILE]

- copy of one expert (every tensor of one MoE layer's expert, bf16) into a device slot from
  each repair source this project has: the host backup as it is stored (``HostBackup``, a
  safetensors file on /dev/shm, mapped and copied through ``copy_weights``), a pinned host copy, a pageable host
  copy, and a copy already on the device (stands in for a peer's memory: one GPU cannot show
  NVLink, whose bandwidth is the peer figure to use on a real node);
- the routing flip: the core's ``active_slots`` + ``local_expert_map`` for a DeepSeek-V3
  sized layout and the in-place write of one rank's ``expert_map`` rows on the device.
"""
import argparse
import json
import tempfile
import time

import torch
from cuda_timing import cuda_seconds

from resilient_ep.active_experts import active_slots, local_expert_map
from resilient_ep.placement import place
from resilient_ep.repair.host_backup import HostBackup
from resilient_ep.repair.staging import copy_weights

SHAPES = {  # per MoE layer, one expert: w13 [2I, H] and w2 [H, I]
    "deepseek-v3": (7168, 2048),
    "qwen3-30b-a3b": (2048, 768),
}


def expert_tensors(hidden, inter):
    return {"w13_weight": torch.randn(2 * inter, hidden, dtype=torch.bfloat16),
            "w2_weight": torch.randn(hidden, inter, dtype=torch.bfloat16)}


def copy_sources(name, hidden, inter, n=10):
    host = expert_tensors(hidden, inter)
    nbytes = sum(t.numel() * t.element_size() for t in host.values())
    slot = {k: torch.empty_like(v, device="cuda") for k, v in host.items()}
    pinned = {k: v.pin_memory() for k, v in host.items()}
    device_copy = {k: v.cuda() for k, v in host.items()}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as root:
        backup = HostBackup(root)
        backup.put("layers.3.mlp.experts", 7, host)

        def from_backup():  # the repair's host source as engines run it
            for k, v in backup.get("layers.3.mlp.experts", 7).items():
                copy_weights(slot[k], v)

        def from_(src, non_blocking):
            def go():
                for k, v in src.items():
                    slot[k].copy_(v, non_blocking=non_blocking)
            return go

        rows = {"host_backup_shm": cuda_seconds(from_backup, n),
                "pinned_host": cuda_seconds(from_(pinned, True), n),
                "pageable_host": cuda_seconds(from_(host, False), n),
                "device_local": cuda_seconds(from_(device_copy, True), n)}
    return {"model": name, "expert_mib": nbytes / 2**20,
            **{f"{k}_ms": v * 1e3 for k, v in rows.items()},
            **{f"{k}_gib_s": nbytes / v / 2**30 for k, v in rows.items()}}


def routing_flip(L=61, E=256, R=32, S=9, n=20):
    lay = place(num_layers=L, num_experts=E, num_ranks=R, slots_per_rank=S, num_nodes=4)
    live = torch.ones(R, dtype=torch.bool)
    live[3] = False
    emap = torch.full((L, E), -1, dtype=torch.int32, device="cuda")
    t = time.perf_counter()
    for _ in range(n):
        active = active_slots(lay, live)
    plan_s = (time.perf_counter() - t) / n
    rows = local_expert_map(active, 0, S)
    write_s = cuda_seconds(lambda: emap.copy_(rows, non_blocking=False), 100)
    return {"layers": L, "experts": E, "ranks": R, "slots_per_rank": S,
            "active_slots_cpu_ms": plan_s * 1e3, "expert_map_write_ms": write_s * 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "copy": [copy_sources(k, *v) for k, v in SHAPES.items()],
           "flip": routing_flip()}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
