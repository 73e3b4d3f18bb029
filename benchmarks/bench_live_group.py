"""Micro-benchmark: one LiveGroup all-gather vs one gloo all_gather between two local
processes (8x128 fp32 tensors). Usage: .venv/bin/python benchmarks/bench_live_group.py"""
import sys, time, multiprocessing as mp, torch
def member(rank, eps, q, kind):
    import torch
    from resilient_ep.transport.group import LiveGroup
    if kind == "gloo":
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=2)
    else:
        g = LiveGroup("b", rank, eps)
    x = torch.randn(8, 128); sizes=[8,8]
    for phase in range(2):
        t0 = time.perf_counter()
        n = 2000 if phase else 200
        for i in range(n):
            if kind == "gloo":
                out = [torch.empty(8,128), torch.empty(8,128)]
                dist.all_gather(out, x)
            else:
                g.allgather([x, x[:, :8]])
        dt = time.perf_counter() - t0
    if rank == 0: q.put(dt / n * 1e6)
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    for kind in ("gloo", "live"):
        eps = [f"ipc:///tmp/lgb-{kind}-{r}" for r in range(2)]
        ps = [ctx.Process(target=member, args=(r, eps, q, kind)) for r in range(2)]
        [p.start() for p in ps]; print(kind, "us/op", round(q.get(timeout=120), 1)); [p.join() for p in ps]
