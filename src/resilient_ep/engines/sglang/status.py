"""``GET /resilience/status`` on SGLang's HTTP server, in the shape the vLLM adapter and the
reference runtime answer::

    {"engine": "sglang", "epoch": 1, "failover": true,
     "ranks": [{"rank": 0, "pid": 9032, "state": "live", "dp_rank": 0, "tp_rank": 0,
                "engine_pid": 9032, "num_local_experts": 8}, ...],
     "uncovered_experts": [],          # [layer, expert] no live rank holds
     "num_experts": 8,
     "failovers": [{"rank": 1, "dp_rank": 1, "cause": "exit", "exitcode": -9, "epoch": 1,
                    "readmitted": 2, "detected_monotonic": ..., "handled_monotonic": ...,
                    "first_output_monotonic": ...}],
     "in_flight": [2, 0],              # requests per rank, as the front end routed them
     "counters": [{"rank": 0, "step_reruns": 1, "sync_reruns": 0, "idle_skips": 0, ...,
                   "kv": {"counters": {"saves": 26, "restored_tokens": 48, ...},
                          "restores": [{"rid": ..., "tokens": 24, "restored": 16,
                                        "source": "peer:0", "seconds": 0.006}]}}],
     "poisoned_requests": [], "dropped_outputs": 0}

``rank`` is the expert-parallel rank (with SGLang's wide-EP layout, DP rank = TP rank = EP
rank), ``pid`` its scheduler process (which is also its "engine", ``engine_pid``). What a
rank holds and its counters come from the ``rank-<r>.json`` each scheduler writes in the
instance directory (``scheduler.py``); ``state`` is read from the membership (``dead`` once
the front end has failed the rank over) and the process table. Times are
``CLOCK_MONOTONIC`` seconds. SGLang's ``--api-key`` applies to this route as to the others.

The route is added to SGLang's FastAPI app (``add_api_route``) before the server starts,
by the launch hook (``cli_args.before_launch``), only when resilience is on.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..common.procs import pid_state

__all__ = ["PATH", "build_status", "install_route", "record_schedulers"]

PATH = "/resilience/status"

_schedulers: dict[int, int] = {}
"""TP rank -> scheduler pid, recorded by the launch hook (with or without failover)."""


def record_schedulers(pids: dict[int, int]) -> None:
    _schedulers.update(pids)


def _rank_files(instance: str) -> dict[int, dict[str, Any]]:
    from .scheduler import rank_file

    out = {}
    for rank in range(max(len(_schedulers), 1)):
        try:
            with open(rank_file(instance, rank)) as f:
                out[rank] = json.load(f)
        except (OSError, ValueError):
            continue
    return out


def build_status() -> dict[str, Any]:
    from .frontend import current_frontend
    from .instance import current

    settings = current()
    fe = current_frontend()
    infos = _rank_files(settings[1]) if settings else {}
    dead = fe.dead_ranks() if fe is not None else set()
    pids = dict(_schedulers)
    if fe is not None:
        pids.update(fe.pids)
    ranks, held = [], {}
    num_experts = num_layers = 0
    for rank in sorted(pids):
        info = infos.get(rank, {})
        state = "dead" if rank in dead else pid_state(pids[rank])
        local = info.get("local_experts", [])
        ranks.append({"rank": rank, "pid": pids[rank], "state": state,
                      "dp_rank": info.get("dp_rank", rank), "tp_rank": info.get("tp_rank", rank),
                      "engine_pid": pids[rank], "num_local_experts": len(local)})
        num_experts = max(num_experts, int(info.get("num_experts", 0)))
        num_layers = max(num_layers, int(info.get("num_layers", 0)))
        for e in local:
            held[e] = held.get(e, 0) + (state == "live")
    uncovered = [[layer, e] for layer in range(num_layers) for e in range(num_experts)
                 if infos and not held.get(e)]
    in_flight = fe.in_flight() if fe is not None else {}
    return {
        "engine": "sglang",
        "epoch": fe.membership.epoch if fe is not None else 0,
        "failover": fe is not None,
        "ranks": ranks,
        "uncovered_experts": uncovered,
        "num_experts": num_experts,
        "failovers": list(fe.failovers) if fe is not None else [],
        "in_flight": [in_flight.get(r, 0) for r in sorted(pids)],
        "counters": [{"rank": r, **infos[r].get("counters", {}), "kv": infos[r].get("kv")}
                     for r in sorted(infos)],
        "poisoned_requests": list(fe.poisoned) if fe is not None else [],
        "dropped_outputs": fe.dropped_outputs if fe is not None else 0,
    }


def install_route() -> bool:
    """Add the route to SGLang's HTTP app (when the HTTP server module is in use; once)."""
    module = sys.modules.get("sglang.srt.entrypoints.http_server")
    if module is None:
        return False
    app = module.app
    if any(getattr(r, "path", None) == PATH for r in app.router.routes):
        return True
    from fastapi.responses import JSONResponse

    async def resilience_status():
        return JSONResponse(build_status())

    app.add_api_route(PATH, resilience_status, methods=["GET"])
    return True
