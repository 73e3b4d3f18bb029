"""Steady-state cost of message authentication on the reference runtime: the same workload
(4 ranks, 16 requests x 48 tokens, no failure) with no authentication, with the HMAC tag
alone (``transport.curve=false``) and with the tag and CURVE (the default), alternated in one
run; reports the median step time of each and its ratio to no authentication.
Usage: .venv/bin/python benchmarks/auth_cost.py [ROUNDS]"""
import statistics
import sys
import tempfile
from pathlib import Path

from resilient_ep.config import ResilienceConfig
from resilient_ep.runtime.coordinator import Coordinator
from resilient_ep.runtime.model_builder import make_model
from resilient_ep.runtime.workload import prompts


MODES = {"off": ["transport.authenticate=false"],
         "tag": ["transport.authenticate=true", "transport.curve=false"],
         "tag+curve": ["transport.authenticate=true", "transport.curve=true"]}


def run(model: Path, mode: str) -> float:
    cfg = ResilienceConfig().with_overrides(MODES[mode])
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
    c = per_message_curve_us()
    print(f"one dispatch-sized message sent + received over ipc: {c['tag']:.1f} us with the "
          f"tag, {c['tag+curve']:.1f} us with the tag and CURVE "
          f"(+{c['tag+curve'] - c['tag']:.1f} us)")
    model = make_model(Path(tempfile.gettempdir()) / "rep-auth-cost-model")
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(pairs):
        for mode in MODES:
            steps[mode].append(run(model, mode))
    for mode in MODES:
        ratios = [a / b for a, b in zip(steps[mode], steps["off"])]
        print(f"{mode:>9s}: step {statistics.median(steps[mode]) * 1e3:.2f} ms, "
              f"/off per round {[round(r, 3) for r in ratios]}, median "
              f"{statistics.median(ratios):.3f}")


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


def per_message_curve_us(rows: int = 16, hidden: int = 128, n: int = 5000) -> dict[str, float]:
    """One dispatch-sized message sent and received over an ipc PUSH -> PULL pair, with
    and without CURVE (the tag on in both), alternated in blocks: microseconds each."""
    import os
    import time

    import torch
    import zmq

    from resilient_ep.transport import curve, wire

    key = b"k" * 32
    wire.set_key(key)
    x, ids = torch.randn(rows, hidden), torch.arange(rows)
    header = {"t": "dispatch", "id": [0, 1], "layer": 0, "step": 7, "epoch": 0, "src": 1}
    ctx = zmq.Context()
    pairs = {}
    d = tempfile.mkdtemp(prefix="rep-curve-")
    for on in (False, True):
        curve.set_enabled(on)
        pull = curve.server(ctx.socket(zmq.PULL))
        pull.bind(f"ipc://{d}/{int(on)}")
        push = curve.client(ctx.socket(zmq.PUSH))
        push.connect(f"ipc://{d}/{int(on)}")
        pairs[on] = (push, pull)
    curve.set_enabled(True)
    for push, pull in pairs.values():  # handshakes done
        push.send_multipart(wire.encode(header, [x, ids]))
        pull.recv_multipart()
    out = {False: [], True: []}
    for _ in range(10):
        for on, (push, pull) in pairs.items():
            t0 = time.perf_counter()
            for _ in range(n // 10):
                push.send_multipart(wire.encode(header, [x, ids]), copy=False)
                wire.decode(pull.recv_multipart(copy=False))
            out[on].append((time.perf_counter() - t0) / (n // 10) * 1e6)
    for push, pull in pairs.values():
        push.close(0)
        pull.close(0)
    ctx.term()
    wire.set_key(None)
    os.system(f"rm -rf {d}")
    return {"tag": statistics.median(out[False]), "tag+curve": statistics.median(out[True])}


if __name__ == "__main__":
    main()
