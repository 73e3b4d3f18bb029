"""Steady-state cost of message authentication on the reference runtime: the same workload
(4 ranks, 16 requests x 48 tokens, no failure) with no authentication, with the HMAC tag
(``transport.curve=false``) and with CURVE (the default; no tag then), alternated in one run;
reports the median step time of each and its ratio to no authentication, after the
per-message costs.
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
         "curve": ["transport.authenticate=true", "transport.curve=true"]}


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
    print("one dispatch-sized message encoded, sent, received, decoded over ipc: "
          + ", ".join(f"{m} {v:.1f} us" for m, v in c.items())
          + f" (tag +{c['tag'] - c['off']:.1f} us, curve +{c['curve'] - c['off']:.1f} us)")
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
    """One dispatch-sized message encoded, sent, received and decoded over an ipc
    PUSH -> PULL pair: without authentication, with the tag, with CURVE (no tag), alternated
    in blocks: microseconds each."""
    import shutil
    import time

    import torch
    import zmq

    from resilient_ep.transport import curve, wire

    key = b"k" * 32
    x, ids = torch.randn(rows, hidden), torch.arange(rows)
    header = {"t": "dispatch", "id": [0, 1], "layer": 0, "step": 7, "epoch": 0, "src": 1}
    ctx = zmq.Context()
    d = tempfile.mkdtemp(prefix="rep-curve-")
    pairs = {}
    for i, mode in enumerate(("off", "tag", "curve")):
        ckey = key if mode == "curve" else None
        pull = curve.server(ctx.socket(zmq.PULL), key=ckey)
        pull.bind(f"ipc://{d}/{i}")
        push = curve.client(ctx.socket(zmq.PUSH), key=ckey)
        push.connect(f"ipc://{d}/{i}")
        tag = key if mode == "tag" else None
        push.send_multipart([wire.encode_header(dict(header, tensors=[]), key=tag)])
        wire.decode_header(pull.recv_multipart()[0], key=tag)  # handshake done
        pairs[mode] = (push, pull, tag)
    out = {m: [] for m in pairs}
    for _ in range(10):
        for mode, (push, pull, tag) in pairs.items():
            wire.set_key(tag)
            t0 = time.perf_counter()
            for _ in range(n // 10):
                push.send_multipart(wire.encode(header, [x, ids]), copy=False)
                wire.decode(pull.recv_multipart(copy=False))
            out[mode].append((time.perf_counter() - t0) / (n // 10) * 1e6)
    wire.set_key(None)
    for push, pull, _ in pairs.values():
        push.close(0)
        pull.close(0)
    ctx.term()
    shutil.rmtree(d, ignore_errors=True)
    return {m: statistics.median(v) for m, v in out.items()}


if __name__ == "__main__":
    main()
