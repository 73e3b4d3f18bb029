"""How to read the host backup onto a GPU: three ways, one expert of DeepSeek-V3 size (bf16).

    PYTHONPATH=src python benchmarks/gpu_host_backup_read.py

- ``load_file``: safetensors ``load_file`` (a pageable copy of the file), then ``copy_``;
- ``staged``: the file memory-mapped, each tensor copied into a reused pinned buffer, then
  an asynchronous host-to-device copy;
- ``registered``: the memory-mapped file registered with CUDA (``cudaHostRegister``), then
  copied straight from the mapping.
"""
import json
import mmap
import tempfile
import time

import torch
from cuda_timing import cuda_seconds
from safetensors.torch import load_file, save_file


def main():
    hidden, inter = 7168, 2048
    host = {"w13_weight": torch.randn(2 * inter, hidden, dtype=torch.bfloat16),
            "w2_weight": torch.randn(hidden, inter, dtype=torch.bfloat16)}
    nbytes = sum(t.numel() * t.element_size() for t in host.values())
    slot = {k: torch.empty_like(v, device="cuda") for k, v in host.items()}
    staging = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    with tempfile.NamedTemporaryFile(dir="/dev/shm", suffix=".safetensors") as f:
        save_file(host, f.name)

        def by_load_file():
            for k, v in load_file(f.name).items():
                slot[k].copy_(v)

        import struct
        with open(f.name, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        hlen = struct.unpack("<Q", mm[:8])[0]
        header = json.loads(mm[8:8 + hlen])
        base = 8 + hlen
        raw = torch.frombuffer(mm, dtype=torch.uint8)
        views = {}
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            views[k] = raw[base + a:base + b].view(torch.bfloat16).view(meta["shape"])

        def staged():
            off = 0
            for k, v in views.items():
                n = v.numel() * v.element_size()
                buf = staging[off:off + n].view(v.dtype).view(v.shape)
                buf.copy_(v)
                slot[k].copy_(buf, non_blocking=True)
                off += n

        rows = {"load_file": cuda_seconds(by_load_file), "staged": cuda_seconds(staged)}
        cudart = torch.cuda.cudart()
        t0 = time.perf_counter()
        err = cudart.cudaHostRegister(raw.data_ptr(), raw.numel(), 0x08)  # read-only
        reg_s = time.perf_counter() - t0
        out = {"expert_mib": nbytes / 2**20, "register_error": int(err),
               "register_ms": reg_s * 1e3}
        if int(err) == 0:
            def registered():
                for k, v in views.items():
                    slot[k].copy_(v, non_blocking=True)
            rows["registered"] = cuda_seconds(registered)
            cudart.cudaHostUnregister(raw.data_ptr())
        for k, v in rows.items():
            out[f"{k}_ms"] = v * 1e3
            out[f"{k}_gib_s"] = nbytes / v / 2**30
        ok = all(torch.equal(slot[k].cpu(), host[k]) for k in host)
        out["exact"] = ok
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
