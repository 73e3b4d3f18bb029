"""``resilient-ep plan``: balancedness and survival of our placement against load-only.

The report is one dict (printed as a table, or as JSON with ``--json``)::

    {"balancedness": x, "survival": {"1": p, ...}, "expected_lost_experts": {"1": n, ...},
     "node_failure_survival": p (when nodes > 1),
     "baseline": {"balancedness": x, "survival": {...}, "expected_lost_experts": {...}},
     "setup": {...}, "seconds": {...}}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..layout import LayoutError
from ..placement import (balancedness, expected_lost_experts, node_failure_survival, place,
                        place_by_load, survival_probability)

__all__ = ["plan_report", "main"]


def load_file(path: str, num_layers: int, num_experts: int) -> np.ndarray:
    """Read a ``.npy`` load file ``[E]`` or ``[L, E]`` with a clear error."""
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"--load: no such file {str(p)!r}") from None
    except Exception as e:  # numpy raises several types for a malformed file
        raise ValueError(f"--load: {str(p)!r} is not a readable .npy array ({e})") from None
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"--load: {str(p)!r} holds {arr.dtype}, expected numbers")
    if arr.ndim == 1 and arr.shape[0] == num_experts:
        return np.broadcast_to(arr.astype(np.float64), (num_layers, num_experts)).copy()
    if arr.shape != (num_layers, num_experts):
        raise ValueError(f"--load: {str(p)!r} has shape {list(arr.shape)}, expected "
                         f"[{num_experts}] or [{num_layers}, {num_experts}] (layers, experts)")
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        raise ValueError(f"--load: {str(p)!r} must hold finite values >= 0")
    return arr.astype(np.float64)


def plan_report(*, experts: int, ranks: int, slots_per_rank: int, nodes: int = 1, layers: int = 1,
                failures: list[int] = (1, 2), load: np.ndarray | None = None,
                samples: int = 20_000, seed: int = 0) -> dict:
    for f in failures:
        if not 0 <= f < ranks:
            raise ValueError(f"--failures: {f} must be in [0, ranks={ranks})")
    t0 = time.perf_counter()
    ours = place(load, num_layers=layers, num_experts=experts, num_ranks=ranks,
                 slots_per_rank=slots_per_rank, num_nodes=nodes)
    t1 = time.perf_counter()
    base = place_by_load(load, num_layers=layers, num_experts=experts, num_ranks=ranks,
                         slots_per_rank=slots_per_rank)
    t2 = time.perf_counter()

    def node_survival(layout) -> float | None:
        return node_failure_survival(layout, nodes) if nodes > 1 else None

    def robustness(layout) -> tuple[dict, dict, dict]:
        surv, ci, lost = {}, {}, {}
        for f in failures:
            est = survival_probability(layout, f, samples=samples, seed=seed)
            surv[str(f)] = est.p
            ci[str(f)] = {"low": est.low, "high": est.high, "exact": est.exact}
            lost[str(f)] = expected_lost_experts(layout, f)
        return surv, ci, lost

    s_ours, ci_ours, lost_ours = robustness(ours)
    s_base, ci_base, lost_base = robustness(base)
    return {
        "balancedness": balancedness(ours, load),
        "survival": s_ours,
        "survival_interval": ci_ours,
        "expected_lost_experts": lost_ours,
        "node_failure_survival": node_survival(ours),
        "baseline": {
            "policy": "load-only (greedy replica counts + balanced packing, as vLLM's default EPLB)",
            "balancedness": balancedness(base, load),
            "survival": s_base,
            "survival_interval": ci_base,
            "expected_lost_experts": lost_base,
            "node_failure_survival": node_survival(base),
        },
        "setup": {"experts": experts, "ranks": ranks, "slots_per_rank": slots_per_rank,
                  "redundant_slots": ranks * slots_per_rank - experts, "nodes": nodes,
                  "layers": layers, "load": "file" if load is not None else "uniform"},
        "seconds": {"place": t1 - t0, "place_baseline": t2 - t1},
    }


def _table(rep: dict) -> str:
    s = rep["setup"]
    lines = [
        f"E={s['experts']} experts, R={s['ranks']} ranks x S={s['slots_per_rank']} slots "
        f"({s['redundant_slots']} redundant), N={s['nodes']} nodes, L={s['layers']} layers, "
        f"{s['load']} load",
        f"{'':28s}{'ours':>12s}{'load-only':>12s}",
        f"{'balancedness':28s}{rep['balancedness']:12.4f}{rep['baseline']['balancedness']:12.4f}",
    ]
    for f in rep["survival"]:
        lines.append(f"{'P(all covered), f=' + f:28s}{rep['survival'][f]:12.4f}"
                     f"{rep['baseline']['survival'][f]:12.4f}")
    for f in rep["expected_lost_experts"]:
        lines.append(f"{'E[lost experts], f=' + f:28s}{rep['expected_lost_experts'][f]:12.3f}"
                     f"{rep['baseline']['expected_lost_experts'][f]:12.3f}")
    if rep["node_failure_survival"] is not None:
        lines.append(f"{'P(all covered), 1 node down':28s}{rep['node_failure_survival']:12.4f}"
                     f"{rep['baseline']['node_failure_survival']:12.4f}")
    lines.append(f"placement took {rep['seconds']['place'] * 1000:.0f} ms "
                 f"(baseline {rep['seconds']['place_baseline'] * 1000:.0f} ms)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, required=True, help="logical experts per layer (E)")
    p.add_argument("--ranks", type=int, required=True, help="EP ranks (R)")
    p.add_argument("--slots-per-rank", type=int, required=True, help="physical slots per rank (S)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (N); ranks are node-major")
    p.add_argument("--layers", type=int, default=1, help="MoE layers (L)")
    p.add_argument("--failures", default="1,2", help="comma-separated failure counts, e.g. 1,2,4")
    p.add_argument("--load", help=".npy file with per-expert load [E] or [L, E] (default uniform)")
    p.add_argument("--samples", type=int, default=20_000, help="Monte Carlo samples when not exact")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    try:
        failures = [int(x) for x in str(args.failures).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--failures: expected comma-separated integers, got {args.failures!r}")
    load = load_file(args.load, args.layers, args.experts) if args.load else None
    try:
        rep = plan_report(experts=args.experts, ranks=args.ranks, slots_per_rank=args.slots_per_rank,
                          nodes=args.nodes, layers=args.layers, failures=failures, load=load,
                          samples=args.samples)
    except LayoutError as e:
        raise ValueError(str(e)) from None
    print(json.dumps(rep) if args.json else _table(rep))
    return 0
