"""Wall-clock timing of GPU work for the benchmarks here (imported as ``cuda_timing``: the
benchmarks run as scripts, so their own folder is on ``sys.path``)."""
import time

import torch


def cuda_seconds(fn, n: int = 10, warmup: int = 1) -> float:
    """Mean seconds per call of ``fn`` over ``n`` calls, the device synchronised around them
    (``warmup`` untimed calls first)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n
