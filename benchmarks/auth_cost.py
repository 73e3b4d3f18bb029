"""Steady-state cost of message authentication on the reference runtime: the same workload
(4 ranks, 16 requests x 48 tokens, no failure) with ``transport.authenticate`` on and off,
alternated in one run; reports the median step time of each and their ratio.
Usage: .venv/bin/python benchmarks/auth_cost.py [PAIRS]"""
import statistics
import sys
import tempfile
from pathlib import Path

from resilient_ep.config import ResilienceConfig
from resilient_ep.runtime.coordinator import Coordinator
from resilient_ep.runtime.model_builder import make_model
from resilient_ep.runtime.workload import prompts


def run(model: Path, auth: bool) -> float:
    cfg = ResilienceConfig().with_overrides([f"transport.authenticate={str(auth).lower()}"])
    with Coordinator(model, num_ranks=4, config=cfg) as c:
        recs = [c.submit(p, 48) for p in prompts(16)]
        for r in recs:
            r.wait(300)
        steps = [s["t1"] - s["t0"] for s in c.steps[20:]]  # past warm-up
    return statistics.median(steps)


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    on_us, off_us = per_message_us()
    print(f"one dispatch-sized message, encode + decode: {on_us:.1f} us with the key, "
          f"{off_us:.1f} us without (+{on_us - off_us:.1f} us)")
    model = make_model(Path(tempfile.gettempdir()) / "rep-auth-cost-model")
    on, off = [], []
    for _ in range(pairs):
        on.append(run(model, True))
        off.append(run(model, False))
    ratios = [a / b for a, b in zip(on, off)]
    print(f"step ms: on {statistics.median(on) * 1e3:.2f}, off {statistics.median(off) * 1e3:.2f}; "
          f"on/off per pair {[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}")




def per_message_us(rows: int = 16, hidden: int = 128, n: int = 20000) -> tuple[float, float]:
    """encode + decode of one dispatch-sized message (``rows`` x ``hidden`` fp32 and the
    expert ids), with and without the key, alternated in blocks: microseconds each."""
    import time

    import torch

    from resilient_ep.transport import wire

    x, ids = torch.randn(rows, hidden), torch.arange(rows)
    header = {"t": "dispatch", "id": [0, 1], "layer": 0, "step": 7, "epoch": 0, "src": 1}
    out = {True: [], False: []}
    for block in range(10):
        for keyed in (True, False):
            wire.set_key(b"k" * 32 if keyed else None)
            t0 = time.perf_counter()
            for _ in range(n // 10):
                wire.decode(wire.encode(header, [x, ids]))
            out[keyed].append((time.perf_counter() - t0) / (n // 10) * 1e6)
    wire.set_key(None)
    return statistics.median(out[True]), statistics.median(out[False])


if __name__ == "__main__":
    main()
