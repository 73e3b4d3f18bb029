"""``GET /resilience/status`` on vLLM's OpenAI API server.

Installed through vLLM's own ``--middleware`` option (``cli_args.py`` appends
:data:`~resilient_ep.engines.vllm.cli_args.STATUS_MIDDLEWARE` when resilience is on), as a
pure ASGI middleware that answers one path and passes everything else through.

The answer has the reference runtime's shape::

    {"engine": "vllm", "epoch": 0,
     "ranks": [{"rank": 0, "pid": 1234, "state": "live", "dp_rank": 0, "tp_rank": 0,
                "engine_pid": 1234, "num_local_experts": 4}, ...],
     "uncovered_experts": [],          # [layer, expert] a token cannot get now
     "experts": {"plan": {...}, "uncovered": [], "repairing": [], "moves": [...],
                 "repair": {"host": {"copies": 1, "bytes": ..., "mib_per_s": ...}},
                 "shadows": 0, "active_shadows": 0, "ranks": [...]},   # with failover
     "num_experts": 8,
     "failovers": [{"dp_rank": 1, "readmitted": 2, "epoch": 1, ...}],   # with failover
     "in_flight": [2, 2],              # this API server's requests per DP rank
     "counters": [{"dp_rank": 0, "fallback_recoveries": 0, "fallback_requests_recomputed": 0,
                   "workers": [{"step_reruns": 1, "kv": {"external_hit_tokens": 64, ...}}]}]}

``rank`` is the expert-parallel rank (``dp_rank * tp_size + tp_rank``); ``pid`` is that
rank's worker process (with TP=1 it is the engine-core process itself, ``engine_pid``).
Who is who is asked once from the workers (``collective_rpc`` of the worker extension, with a
deadline) and cached; ``state`` is then re-read from the process table on every request
(``live`` / ``dead``), and ``uncovered_experts`` is computed from the experts the live ranks
hold. ``epoch`` is the front end's count of engine ranks lost (``frontend.py``), 0 without
failover.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from ..common.procs import pid_state as _pid_state

__all__ = ["ResilienceStatusMiddleware", "build_status", "PATH", "METRICS_PATH"]

PATH = "/resilience/status"
REJOIN_PREFIX = "/resilience/ranks/"
REJOIN_SUFFIX = "/rejoin"
METRICS_PATH = "/metrics"
RPC_TIMEOUT_S = 10.0
RANK_INFO_METHOD = "resilient_ep_rank_info"
COUNTERS_METHOD = "resilient_ep_counters"


def build_status(infos: list[dict[str, Any]], epoch: int = 0,
                 dead_dp_ranks: set[int] = frozenset()) -> dict[str, Any]:
    """The status document from the workers' ``resilient_ep_rank_info`` answers.

    A rank is ``dead`` when its process is gone or the front end has failed its DP rank over
    (its worker may outlive its engine core by a few seconds)."""
    ranks = []
    held: dict[tuple[int, int], int] = {}  # (layer, expert) -> live replicas
    num_experts = 0
    for info in sorted(infos, key=lambda i: i["ep_rank"]):
        remote = bool(info.get("host")) and info["host"] != os.environ.get("VLLM_HOST_IP", "")
        state = ("dead" if int(info["dp_rank"]) in dead_dp_ranks  # remote: the membership says
                 else "live" if remote else _pid_state(int(info["pid"])))
        layers = info.get("local_experts") or []
        ranks.append({
            "rank": int(info["ep_rank"]), "pid": int(info["pid"]), "state": state,
            "dp_rank": int(info["dp_rank"]), "tp_rank": int(info["tp_rank"]),
            "engine_pid": int(info["engine_pid"]),
            "num_local_experts": len(layers[0]) if layers else 0,
        })
        for layer, experts in enumerate(layers):
            for e in experts:
                num_experts = max(num_experts, e + 1)
                held.setdefault((layer, e), 0)
                if state == "live":
                    held[(layer, e)] += 1
    uncovered = sorted([layer, e] for (layer, e), n in held.items() if n == 0)
    return {"engine": "vllm", "epoch": epoch, "ranks": ranks,
            "uncovered_experts": uncovered, "num_experts": num_experts}


async def query_rank_infos(engine_client: Any, timeout_s: float = RPC_TIMEOUT_S,
                           skip: set[int] = frozenset()) -> list[dict]:
    """Ask every worker of every engine (all DP ranks, not only the first), except the DP
    ranks in ``skip`` (lost: they would never answer)."""
    core = engine_client.engine_core
    engines = getattr(core, "core_engines", None)
    if engines is not None and hasattr(core, "_call_utility_async"):
        calls = [core._call_utility_async("collective_rpc", RANK_INFO_METHOD, timeout_s, (), None,
                                          engine=e)
                 for i, e in enumerate(engines) if i not in skip]
        per_engine = await asyncio.wait_for(asyncio.gather(*calls), timeout_s)
    else:  # in-process engine core
        per_engine = [await asyncio.wait_for(
            engine_client.collective_rpc(RANK_INFO_METHOD, timeout=timeout_s), timeout_s)]
    return [info for workers in per_engine for info in workers]


async def query_counters(core: Any, timeout_s: float = RPC_TIMEOUT_S) -> list[dict]:
    """Every live engine's failover counters (``resilient_ep_counters``: in-place step
    re-runs, preemption fallbacks, KV restore traffic), one entry per live DP rank."""
    dead = set(getattr(core, "resilient_dead", ()))
    engines = [e for i, e in enumerate(core.core_engines) if i not in dead]
    # Each engine on its own deadline: one lost between the membership read and its answer
    # (a status asked at the moment of a failure) costs its own entry, not the whole status.
    got = await asyncio.gather(
        *[asyncio.wait_for(core._call_utility_async(COUNTERS_METHOD, engine=e), timeout_s)
          for e in engines], return_exceptions=True)
    return [r if isinstance(r, dict) else {"error": repr(r)} for r in got]


def experts_summary(counters: list[dict]) -> dict[str, Any] | None:
    """Placement, coverage and repair over every live worker's ``experts`` status (every
    worker plans alike, so the lowest live rank's view of the plan speaks for all):
    ``uncovered`` (no live copy anywhere), ``repairing`` (a copy on its way),
    ``unavailable`` (either: what a token routed there cannot get now), repair totals per
    source, the shadows, and each rank's slots."""
    states = [w["experts"] for c in counters for w in c.get("workers", [])
              if isinstance(w, dict) and isinstance(w.get("experts"), dict)]
    if not states:
        return None
    states.sort(key=lambda s: s["rank"])
    first = states[0]
    repairing = sorted({e for s in states for e in s["pending"]})
    by_source: dict[str, dict[str, float]] = {}
    for s in states:
        for kind, v in s["repair"]["by_source"].items():
            agg = by_source.setdefault(kind, {"copies": 0, "bytes": 0, "seconds": 0.0,
                                              "failures": 0})
            for k in agg:
                agg[k] += v.get(k, 0) or 0
    for v in by_source.values():
        v["mib_per_s"] = (v["bytes"] / 2**20 / v["seconds"]) if v["seconds"] > 0 else None
    counters_sum: dict[str, int] = {}
    for s in states:
        for k, v in s["counters"].items():
            counters_sum[k] = counters_sum.get(k, 0) + int(v)
    return {
        "plan": first["plan"], "epoch": first["epoch"],
        "uncovered": list(first["uncovered"]), "repairing": repairing,
        "unavailable": sorted(set(first["uncovered"]) | set(repairing)),
        "moves": first["moves"], "repair": by_source, "counters": counters_sum,
        "copies": sorted((dict(d, rank=s["rank"]) for s in states for d in s["repair"]["done"]),
                         key=lambda d: d.get("finished_monotonic") or 0),
        "shadows": sum(len(s["shadows"]) for s in states),
        "active_shadows": sum(int(s["active_shadows"]) for s in states),
        "ranks": [{"rank": s["rank"], "held": s["held"], "shadows": s["shadows"],
                   "pending": s["pending"], "disk_source": s["disk_source"],
                   "host_backup": s["host_backup"]} for s in states],
    }


def _lost_rank_infos(infos: list[dict], lost: set[int]) -> list[dict]:
    """Placeholders for the workers of lost DP ranks nobody asked before they died."""
    tp = 1 + max((int(i["tp_rank"]) for i in infos), default=0)
    return [{"dp_rank": d, "tp_rank": t, "ep_rank": d * tp + t, "pid": 0, "engine_pid": 0,
             "local_experts": []} for d in sorted(lost) for t in range(tp)]


def _rejoins_of(rejoiner: Any) -> tuple[list[dict[str, Any]], bool]:
    """The rejoin records, and whether they are the last known ones (the launcher's rejoin
    service, with several API servers, did not answer in time)."""
    snapshot = getattr(rejoiner, "snapshot", None)
    if snapshot is None:  # this process runs the rejoins
        return rejoiner.status(), False
    snap = snapshot()
    return list(snap.get("rejoins") or []), bool(snap.get("stale"))


class ResilienceStatusMiddleware:
    """Pure ASGI middleware answering ``GET /resilience/status`` and adding the resilience
    metrics (``resilient_ep.metrics``, :func:`.metrics.from_status`) to vLLM's own
    ``GET /metrics``."""

    def __init__(self, app: Any):
        self.app = app
        self._infos: list[dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def __call__(self, scope, receive, send):
        path = scope.get("path") if scope.get("type") == "http" else None
        if path == METRICS_PATH and scope.get("method") in ("GET", "HEAD"):
            await self._metrics(scope, receive, send)
            return
        if path is not None and path.startswith(REJOIN_PREFIX) and path.endswith(REJOIN_SUFFIX):
            await self._rejoin(scope, send, path[len(REJOIN_PREFIX):-len(REJOIN_SUFFIX)])
            return
        if path != PATH:
            await self.app(scope, receive, send)
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await _respond(send, 405, {"error": "method not allowed"})
            return
        state = getattr(scope.get("app"), "state", None)
        if not _authorized(scope, state):
            await _respond(send, 401, {"error": "Unauthorized"})
            return
        code, body = await self.status(state)
        await _respond(send, code, body)

    async def _rejoin(self, scope, send, raw_rank: str) -> None:
        """``POST /resilience/ranks/{rank}/rejoin``: start a replacement for a lost DP rank
        (202 with its record; ``GET /resilience/status`` shows its progress)."""
        if scope.get("method") != "POST":
            await _respond(send, 405, {"error": "method not allowed: POST to rejoin a rank"})
            return
        state = getattr(scope.get("app"), "state", None)
        if not _authorized(scope, state):
            await _respond(send, 401, {"error": "Unauthorized"})
            return
        try:
            rank = int(raw_rank)
        except ValueError:
            await _respond(send, 400, {"error": f"rank: {raw_rank!r} is not a DP rank number"})
            return
        engine_client = getattr(state, "engine_client", None)
        core = getattr(engine_client, "engine_core", None)
        rejoiner = getattr(core, "resilient_rejoiner", None)
        if rejoiner is None:
            await _respond(send, 409, {"error": "rejoin needs resilience on with DP > 1 and "
                                                "expert parallelism"})
            return
        from .rejoin import RejoinError

        loop = asyncio.get_running_loop()
        if core._re_loop is None:
            core._re_loop = loop
        try:  # with several API servers the launcher answers: off this loop
            record = await loop.run_in_executor(None, rejoiner.request, rank)
        except RejoinError as e:
            await _respond(send, 409, {"error": str(e), "rank": rank})
            return
        await _respond(send, 202, record)

    async def status(self, state) -> tuple[int, dict]:
        """(HTTP status, the status document) of the API server whose app state is ``state``."""
        engine_client = getattr(state, "engine_client", None)
        if engine_client is None:
            return 503, {"error": "engine not ready"}
        try:
            core = getattr(engine_client, "engine_core", None)
            async with self._lock:
                joins = len(getattr(core, "resilient_joins", ()))
                if joins != getattr(self, "_joins_seen", 0):  # a rank came back: new pids
                    self._infos, self._joins_seen = None, joins
                if self._infos is None:
                    # A rank lost before this API server first asked answers no more: it is
                    # listed from what the others know (DP rank, dead), without pids.
                    lost = set(getattr(core, "resilient_dead", ()))
                    infos = await query_rank_infos(engine_client, skip=lost)
                    self._infos = infos + _lost_rank_infos(infos, lost)
            body = build_status(self._infos, epoch=int(getattr(core, "resilient_epoch", 0)),
                                dead_dp_ranks=set(getattr(core, "resilient_dead", ())))
            body["failovers"] = list(getattr(core, "resilient_events", []))
            rejoiner = getattr(core, "resilient_rejoiner", None)
            if rejoiner is not None:  # the launcher's, with several API servers: off this loop
                rejoins, stale = await asyncio.get_running_loop().run_in_executor(
                    None, _rejoins_of, rejoiner)
                body["rejoins"] = rejoins
                body["rejoins_stale"] = stale  # the launcher did not answer: its last known
                body["joins"] = list(getattr(core, "resilient_joins", []))
                active = {r["rank"]: r["state"] for r in rejoins
                          if r["state"] in ("queued", "exporting", "joining", "warming",
                                            "verifying")}
                for entry in body["ranks"]:
                    if entry["dp_rank"] in active:
                        entry["state"] = active[entry["dp_rank"]]
            body["poisoned_requests"] = list(getattr(core, "resilient_poisoned", []))
            inflight = getattr(core, "engine_inflight", None)
            if inflight is not None:  # this API server's requests in flight, per DP rank
                body["in_flight"] = [int(inflight[e]) for e in core.core_engines]
            liveness = getattr(core, "resilient_liveness", None)
            if liveness is not None:  # the monitor (or the subscription) of this process
                body["liveness"] = {"dropped": dict(liveness.dropped),
                                    "restarts": int(liveness.restarts)}
            if getattr(core, "resilient_events", None) is not None:
                body["counters"] = await query_counters(core)
                experts = experts_summary(body["counters"])
                if experts is not None:
                    body["experts"] = experts
                    layers = max(1, len((self._infos or [{}])[0].get("local_experts") or [[]]))
                    body["uncovered_experts"] = [[layer, e] for layer in range(layers)
                                                 for e in experts["unavailable"]]
        except (asyncio.TimeoutError, Exception) as e:  # an engine that does not answer
            return 503, {"error": f"engine ranks did not answer: {e!r}"}
        return 200, body

    async def _metrics(self, scope, receive, send) -> None:
        """vLLM's ``/metrics`` answer with ours appended (uncompressed: the scrape asks vLLM
        without ``Accept-Encoding``)."""
        from ...metrics import render
        from .metrics import from_status

        inner = dict(scope, headers=[(k, v) for k, v in scope.get("headers") or []
                                     if k.lower() != b"accept-encoding"])
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(inner, receive, capture)
        body = b"".join(chunks)
        if start.get("status", 200) == 200:
            code, status = await self.status(getattr(scope.get("app"), "state", None))
            if code == 200:
                body += render(from_status(status))
            else:
                body += f"# resilient-ep metrics unavailable: {status.get('error')}\n".encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 200),
                    "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope.get("method") == "HEAD" else body})


def _authorized(scope, state) -> bool:
    """Same rule as vLLM's AuthenticationMiddleware (``--api-key`` / ``VLLM_API_KEY``)."""
    args = getattr(state, "args", None)
    tokens = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
    if not tokens:
        return True
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode()
    return any(auth == f"Bearer {t}" for t in tokens)


async def _respond(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
