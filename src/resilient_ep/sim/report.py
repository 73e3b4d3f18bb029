"""Outputs: a terminal table, the ``--json`` object, a PNG of goodput over time."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from resilient_ep.sim.metrics import PolicyResult
from resilient_ep.sim.scenario import Scenario

__all__ = ["table", "to_json", "plot"]


def _fmt_stalls(stalls: list[float]) -> str:
    if not stalls:
        return "-"
    if len(stalls) <= 3:
        return ", ".join(_num(s) for s in stalls)
    return f"{len(stalls)}x, max {_num(max(stalls))}, mean {_num(sum(stalls) / len(stalls))}"


def _num(x: float | None) -> str:
    if x is None:
        return "never"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.1f}"
    return f"{x:.3f}"


def table(sc: Scenario, results: dict[str, PolicyResult]) -> str:
    """A fixed-width table, one row per policy."""
    head = ["policy", "stall_s", "reint_pause_s", "t_to_95%_s", "lost_req", "recomputed_tok",
            "availability", "goodput_tok/s"]
    rows = [head]
    for name, r in results.items():
        rows.append([
            name,
            _fmt_stalls(r.stall_s),
            _num(r.reintegration_pause_s),
            _num(r.time_to_95pct_s) if r.stall_s else "-",
            str(r.requests_lost),
            str(r.recomputed_tokens),
            f"{100 * r.availability:.2f} %",
            f"{r.mean_goodput:.0f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"scenario {sc.name or '(unnamed)'}: {sc.ranks} ranks in {sc.nodes} nodes, "
             f"{sc.duration_s:g} s, {len(next(iter(results.values())).stall_s)} failures, "
             f"model {sc.model.name}"]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(sc: Scenario, results: dict[str, PolicyResult]) -> str:
    """``{"scenario": ..., "policies": {name: {...}}}``."""
    obj: dict[str, Any] = {
        "scenario": {"name": sc.name, "seed": sc.seed, "ranks": sc.ranks, "nodes": sc.nodes,
                     "duration_s": sc.duration_s},
        "policies": {name: r.to_dict() for name, r in results.items()},
    }
    text = json.dumps(obj, indent=1)
    # Keep number lists (the goodput series) on one line each.
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",")
                            + "]", text)


_NUMBER_LIST = re.compile(r"\[\s*((?:-?[0-9.eE+-]+,?\s*)+)\]")


def plot(sc: Scenario, results: dict[str, PolicyResult], path: str | Path) -> Path:
    """Goodput over time for every policy, failures marked; written with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for name, r in results.items():
        ax.plot(r.goodput_t_s, r.goodput, label=name, linewidth=1.2)
    times = sorted({t for r in results.values() for t in r.failure_times_s})
    for i, t in enumerate(times[:50]):
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8,
                   label="failure" if i == 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("goodput (output tokens/s)")
    ax.set_title(f"{sc.name or 'scenario'}: {sc.ranks} ranks, {sc.model.name}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
