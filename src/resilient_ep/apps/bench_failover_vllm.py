"""``resilient-ep bench failover --engine vllm [--json]``: the reference runtime's failover
benchmark on real vLLM (``resilient-ep serve --engine vllm``, DP=2 + EP, tiny fp32 model).

Per trial, side by side (three server starts):
- **off**: the same instance with resilience's failover off (``RESILIENT_EP_VLLM_FAILOVER=0``:
  vLLM's own gloo datapath, plus only the patches expert parallelism needs on the CPU) —
  throughput;
- **on**: ``--enable-resilience`` — throughput, then a failure-free streamed run, then the
  same streams with ``VLLM::EngineCore_DP1`` SIGKILLed mid-stream;
- **hang**: ``--enable-resilience`` — the same, with DP rank 1 frozen (SIGSTOP of its engine
  core and its worker) instead: the front end fences it after
  ``detector.heartbeat_timeout_ms`` (``--hang-timeout-ms``) without beacons.

Figures (same keys as the reference runtime's bench):
- ``overhead_ratio``: median over trials of on/off throughput (tokens/s, ``--requests``
  concurrent completions of ``--max-tokens``; each server's figure is the median of
  ``--throughput-runs`` rounds; the on/off order alternates between trials);
- ``crash_stall_ms``: per trial, the longest gap between two tokens of any stream, from the
  last token before the kill to the end: what a client sees;
- ``crash_detect_ms``: kill -> the front end has failed the rank over (re-admitted its
  requests), from ``/resilience/status``;
- ``restart_s``: a full ``vllm serve`` restart, measured as process start -> first token of
  a completion, every server start of the run (both arms);
- ``hang_stall_ms`` / ``hang_detect_ms``: the same for the frozen rank;
- ``outputs_equal``: every stream of every failure trial equals the failure-free run;
- ``requests_lost``: streams of the failure trials that ended in an error or short of
  ``--max-tokens``.

With ``--context 64,1024,4096`` it adds ``contexts``: one object per context length
(:func:`run_context`: prompts of that many random token ids, prefix caching off so nothing
is served from the failure-free pass), with crash and hang stalls, what the survivor re-ran
(``*_survivor_step_reruns``) and recomputed (``*_survivor_requests_recomputed``: requests
preempted, 0 when the in-place re-run worked), the re-admitted requests' tokens restored
from KV checkpoints and recomputed, throughput on/off and CPU time per token on/off.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

__all__ = ["run", "main"]

PROMPTS = ["the cat sat on the", "one two three", "i want to go home", "we say that the world",
           "a b c d", "she went to the", "my name is", "it was the best of"]
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
               "--max-num-seqs", "16", "--seed", "0", "--data-parallel-size", "2",
               "--enable-expert-parallel"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, model: Path, workdir: Path, resilience: bool, tag: str, timeout_s: float,
                 hang_timeout_ms: float = 1000.0, extra_args: list[str] | None = None,
                 base_args: list[str] | None = None):
        self.model, self.port = str(model), _free_port()
        cfg = workdir / "resilience.yaml"
        cfg.write_text("resilience:\n  detector:\n    heartbeat_interval_ms: 50\n"
                       f"    heartbeat_timeout_ms: {hang_timeout_ms}\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
        env.pop("RESILIENT_EP_VLLM_ACTIVE", None)
        # Both arms run the resilience plugin's CPU expert-parallel patches (vLLM cannot run
        # DP + EP on the CPU without them); "off" turns the failover datapath off.
        env["RESILIENT_EP_VLLM_FAILOVER"] = "1" if resilience else "0"
        cmd = [sys.executable, "-m", "resilient_ep.cli", "serve", self.model, "--engine", "vllm",
               "--port", str(self.port), *(SERVER_ARGS if base_args is None else base_args),
               *(extra_args or []),
               "--enable-resilience", "--resilience-config", str(cfg),
               "--api-server-count", "1"]
        self.log = open(workdir / f"serve-{tag}.log", "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_ready(timeout_s)
            self.complete(PROMPTS[0], 1)
        except BaseException:
            self.stop()
            raise
        self.restart_s = time.monotonic() - self.t0

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = self.t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve not ready after {timeout_s:.0f} s; see {self.log.name}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/resilience/status", timeout=30) as r:
            return json.loads(r.read())

    def complete(self, prompt: str, max_tokens: int) -> list[int]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["choices"][0]["token_ids"]

    def stream(self, prompt: str, max_tokens: int, out: dict, dp_rank: int | None = None) -> None:
        """One streaming completion into ``out`` (tokens, their arrival times, finish);
        ``dp_rank`` pins it to one engine rank (vLLM's ``X-data-parallel-rank`` header)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        headers = {"content-type": "application/json"}
        if dp_rank is not None:
            headers["X-data-parallel-rank"] = str(dp_rank)
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers=headers)
        out["tokens"], out["times"] = [], []
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"][0]
                        ids = choice.get("token_ids") or []
                        out["tokens"] += ids
                        out["times"] += [time.monotonic()] * len(ids)
                        out["finish"] = choice.get("finish_reason") or out.get("finish")
        except Exception as e:
            out["error"] = repr(e)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # engine cores, workers
        except ProcessLookupError:
            pass
        self.log.close()


def _throughput(server: _Server, n: int, max_tokens: int, prompts=None) -> float:
    prompts = [(prompts or PROMPTS)[i % len(prompts or PROMPTS)] for i in range(n)]
    threads, outs = [], [None] * n
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        def one(i=i, p=p):
            outs[i] = server.complete(p, max_tokens)
        threads.append(threading.Thread(target=one))
        threads[-1].start()
    for t in threads:
        t.join(timeout=600)
    dt = time.perf_counter() - t0
    return sum(len(o or ()) for o in outs) / dt


def _streams(server: _Server, n: int, max_tokens: int, kill_pid: int | None = None,
             kill_signal: int = signal.SIGKILL, prompts=None):
    prompts = prompts or PROMPTS
    outs = [dict() for _ in range(n)]
    threads = [threading.Thread(target=server.stream,
                                args=(prompts[i % len(prompts)], max_tokens, outs[i]))
               for i in range(n)]
    for t in threads:
        t.start()
    killed_at = None
    if kill_pid is not None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all(len(o.get("tokens", ())) >= 8 for o in outs):
            if any(o.get("finish") or "error" in o for o in outs):
                break
            time.sleep(0.005)
        killed_at = time.monotonic()
        os.kill(kill_pid, kill_signal)
    for t in threads:
        t.join(timeout=600)
    return outs, killed_at


def _stall_s(outs: list[dict], killed_at: float) -> float:
    worst = 0.0
    for o in outs:
        times = o.get("times", [])
        before = [t for t in times if t <= killed_at]
        seq = ([before[-1]] if before else [killed_at]) + [t for t in times if t > killed_at]
        worst = max([worst] + [b - a for a, b in zip(seq, seq[1:])])
    return worst


def _stream_detail(o: dict, killed_at: float) -> dict:
    """Where a stream stood at the kill, and its longest pause after it (ms)."""
    times = o.get("times", [])
    before = [t for t in times if t <= killed_at]
    seq = ([before[-1]] if before else [killed_at]) + [t for t in times if t > killed_at]
    gaps = [b - a for a, b in zip(seq, seq[1:])]
    worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
    return {"tokens_before": len(before), "tokens_after": len(times) - len(before),
            "max_gap_ms": round(gaps[worst] * 1000, 1) if gaps else 0.0,
            "max_gap_starts_ms_after_kill": round((seq[worst] - killed_at) * 1000, 1)
            if gaps else None}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def _token_prompts(model: Path, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids (seeded by the length)."""
    import random

    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    rng = random.Random(length)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


def _tree_cpu_s(server: _Server) -> float:
    """CPU seconds used so far by every process of the server (API server, engines, workers)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(server.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def _survivor_counters(status: dict) -> dict:
    """Sum of the live engines' failover counters (``/resilience/status`` -> counters)."""
    out = {"step_reruns": 0, "dummy_reruns": 0, "fallback_requests_recomputed": 0,
           "kv_restored_tokens": 0, "kv_loads": 0}
    for eng in status.get("counters", []):
        out["fallback_requests_recomputed"] += int(eng.get("fallback_requests_recomputed", 0))
        for w in eng.get("workers", []):
            out["step_reruns"] += int(w.get("step_reruns", 0))
            out["dummy_reruns"] += int(w.get("dummy_reruns", 0))
            kv = w.get("kv") or {}
            out["kv_restored_tokens"] += int(kv.get("external_hit_tokens", 0))
            out["kv_loads"] += int(kv.get("loads", 0))
    return out


def run_context(model: Path, workdir: Path, length: int, args, n: int, max_tokens: int,
                log=print) -> dict:
    """One context length: throughput on/off and CPU time per token, then a crash (SIGKILL of
    ``VLLM::EngineCore_DP1``) and a hang (SIGSTOP of the whole rank) with streams of
    ``length``-token prompts; what the survivor recomputed and what the re-admitted
    requests restored from KV checkpoints."""
    import psutil

    prompts = _token_prompts(model, max(n, 2), length)
    extra = ["--max-model-len", str(length + max_tokens + 64), "--block-size", "32",
             "--no-enable-prefix-caching"]
    out: dict = {"context_tokens": length}
    for arm in ("off", "on", "hang"):
        log(f"[context {length}] starting vllm serve ({arm}) ...")
        server = _Server(model, workdir, arm != "off", f"ctx{length}-{arm}", args.start_timeout,
                         args.hang_timeout_ms, extra_args=extra)
        try:
            if arm != "hang":
                _throughput(server, n, 8, prompts)  # warm-up
                cpu0 = _tree_cpu_s(server)
                t0 = time.perf_counter()
                tput = _throughput(server, n, max_tokens, prompts)
                wall = time.perf_counter() - t0
                cpu = _tree_cpu_s(server) - cpu0
                out[f"throughput_{arm}_tok_s"] = tput
                out[f"cpu_ms_per_token_{arm}"] = cpu * 1000 / max(1.0, tput * wall)
                log(f"[context {length}] {arm}: {tput:.1f} tok/s, "
                    f"{out[f'cpu_ms_per_token_{arm}']:.2f} CPU ms/token")
                if arm == "off":
                    continue
            victim = next(r for r in server.status()["ranks"] if r["dp_rank"] == 1)
            workers = psutil.Process(victim["engine_pid"]).children(recursive=True)
            clean, _ = _streams(server, n, max_tokens, prompts=prompts)
            sig = signal.SIGKILL if arm == "on" else signal.SIGSTOP
            failed, at = _streams(server, n, max_tokens, kill_pid=victim["engine_pid"],
                                  kill_signal=sig, prompts=prompts)
            if sig == signal.SIGSTOP:
                for w in workers:
                    try:
                        os.kill(w.pid, signal.SIGSTOP)
                    except ProcessLookupError:
                        pass
            status = server.status()
            events = status.get("failovers", [])
            kind = "crash" if arm == "on" else "hang"
            counters = _survivor_counters(status)
            readmitted_tokens = sum(int(e.get("readmitted_tokens", 0)) for e in events)
            readmitted = sum(int(e.get("readmitted", 0)) for e in events)
            out[f"{kind}_stall_ms"] = _stall_s(failed, at) * 1000
            out[f"{kind}_streams"] = [_stream_detail(o, at) for o in failed]
            out[f"{kind}_detect_ms"] = ((events[0]["handled_monotonic"] - at) * 1000
                                        if events else None)
            out[f"{kind}_outputs_equal"] = all(a.get("tokens") == b.get("tokens")
                                               and "error" not in b
                                               for a, b in zip(clean, failed))
            out[f"{kind}_survivor_step_reruns"] = counters["step_reruns"] + counters["dummy_reruns"]
            out[f"{kind}_survivor_requests_recomputed"] = counters["fallback_requests_recomputed"]
            out[f"{kind}_readmitted"] = readmitted
            out[f"{kind}_readmitted_tokens_restored"] = counters["kv_restored_tokens"]
            out[f"{kind}_readmitted_tokens_recomputed"] = max(
                0, readmitted_tokens - counters["kv_restored_tokens"])
            out[f"{kind}_recomputed_per_readmitted"] = (
                out[f"{kind}_readmitted_tokens_recomputed"] / readmitted if readmitted else None)
            log(f"[context {length}] {kind}: stall {out[f'{kind}_stall_ms']:.0f} ms, "
                f"re-admitted {readmitted} ({counters['kv_restored_tokens']} tokens restored, "
                f"{out[f'{kind}_readmitted_tokens_recomputed']} recomputed), survivor re-ran "
                f"{out[f'{kind}_survivor_step_reruns']} step(s), recomputed "
                f"{counters['fallback_requests_recomputed']} request(s), outputs equal "
                f"{out[f'{kind}_outputs_equal']}")
        finally:
            server.stop()
    if out.get("throughput_off_tok_s"):
        out["overhead_ratio"] = out["throughput_on_tok_s"] / out["throughput_off_tok_s"]
        out["cpu_per_token_ratio"] = out["cpu_ms_per_token_on"] / out["cpu_ms_per_token_off"]
    return out


def run(args: argparse.Namespace, log=print, *, server_cls=None, engine: str = "vllm",
        setup: dict | None = None) -> dict:
    """The benchmark on ``server_cls`` (default: vLLM's ``_Server``; the SGLang bench passes
    its own, ``bench_failover_sglang.py``, with the same methods)."""
    from resilient_ep.runtime.workload import ensure_model

    server_cls = server_cls or _Server
    model = ensure_model(args.model, quiet=args.json)
    trials = args.trials if args.trials is not None else 2
    n = args.requests if args.requests is not None else 4
    max_tokens = args.max_tokens if args.max_tokens is not None else 256
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    workdir = (Path(args.workdir or os.environ.get("TMPDIR", "/tmp"))
               / f"bench-{engine}-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    on, off, restart, stalls, detects, equal, readmitted = [], [], [], [], [], [], []
    lost: list[int] = []  # per failure trial: streams that errored or came back short
    hang_stalls, hang_detects, trial_detail = [], [], []

    def fail_rank(server: _Server, sig: int, stalls_out: list, detects_out: list) -> None:
        """Stream, fail DP rank 1 (SIGKILL its engine core / SIGSTOP the whole rank), check
        the outputs against the failure-free streams; records the stall and failover time."""
        import psutil

        victim = next(r for r in server.status()["ranks"] if r["dp_rank"] == 1)
        workers = psutil.Process(victim["engine_pid"]).children(recursive=True)
        clean, _ = _streams(server, n, max_tokens)
        failed, killed_at = _streams(server, n, max_tokens, kill_pid=victim["engine_pid"],
                                     kill_signal=sig)
        if sig == signal.SIGSTOP:  # the whole rank freezes, not only its engine core
            for w in workers:
                try:
                    os.kill(w.pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
        live = all(o.get("times") and o["times"][0] <= killed_at < o["times"][-1]
                   for o in failed)
        if not live:
            raise RuntimeError("a stream finished before the failure: raise --max-tokens")
        status = server.status()
        events = status.get("failovers", [])
        equal.append(all(a.get("tokens") == b.get("tokens") and "error" not in b
                         for a, b in zip(clean, failed)))
        lost.append(sum(1 for o in failed
                        if "error" in o or len(o.get("tokens", ())) != max_tokens))
        stall = _stall_s(failed, killed_at)
        trial_detail.append({"signal": signal.Signals(sig).name, "epoch": status["epoch"],
                             "events": events,
                             "streams": [_stream_detail(o, killed_at) for o in failed]})
        if events:
            readmitted.append(events[0]["readmitted"])
        log(f"  {signal.Signals(sig).name} of rank 1: stall {stall * 1000:.0f} ms, outputs "
            f"equal {equal[-1]}, epoch {status['epoch']}, re-admitted "
            f"{events[0]['readmitted'] if events else '?'}")
        stalls_out.append(stall)
        if events:
            detects_out.append(events[0]["handled_monotonic"] - killed_at)

    for trial in range(trials):
        order = ("off", "on") if trial % 2 == 0 else ("on", "off")
        for arm in (*order, "hang"):
            log(f"[trial {trial}] starting {engine} server ({arm}) ...")
            server = server_cls(model, workdir, arm != "off", f"{trial}-{arm}",
                                timeout_s=args.start_timeout,
                                hang_timeout_ms=args.hang_timeout_ms)
            try:
                restart.append(server.restart_s)
                log(f"[trial {trial}] {arm}: ready + first token {server.restart_s:.1f} s")
                if arm == "hang":
                    fail_rank(server, signal.SIGSTOP, hang_stalls, hang_detects)
                    continue
                _throughput(server, n, 8)  # warm-up
                tput = statistics.median(_throughput(server, n, max_tokens)
                                         for _ in range(max(1, args.throughput_runs)))
                (on if arm == "on" else off).append(tput)
                log(f"[trial {trial}] {arm}: {tput:.1f} tok/s")
                if arm == "on":
                    fail_rank(server, signal.SIGKILL, stalls, detects)
            finally:
                server.stop()
    contexts = {}
    for length in _context_lengths(getattr(args, "context", None)):
        contexts[str(length)] = run_context(model, workdir, length, args, n, max_tokens, log)
    ratios = [a / b for a, b in zip(on, off)]
    crash_ms = [s * 1000 for s in stalls]
    restart_med = statistics.median(restart)
    stall_med = _pct(crash_ms, 0.5)
    res = {
        "engine": engine,
        "overhead_ratio": statistics.median(ratios),
        "throughput_on_tok_s": on, "throughput_off_tok_s": off,
        "crash_stall_ms_median": stall_med, "crash_stall_ms_p99": _pct(crash_ms, 0.99),
        "crash_detect_ms_median": _pct([d * 1000 for d in detects], 0.5),
        "hang_stall_ms_median": _pct([h * 1000 for h in hang_stalls], 0.5),
        "hang_stall_ms_p99": _pct([h * 1000 for h in hang_stalls], 0.99),
        "hang_detect_ms_median": _pct([d * 1000 for d in hang_detects], 0.5),
        "restart_s_median": restart_med,
        "restart_over_crash_stall": (restart_med * 1000 / stall_med) if stall_med else None,
        "outputs_equal": all(equal) and len(equal) == 2 * trials,
        "requests_lost": sum(lost),
        "trials": trials,
        "setup": setup or {
            "dp": 2, "tp": 1, "expert_parallel": True, "requests": n,
            "max_tokens": max_tokens, "dtype": "float32", "enforce_eager": True,
            "heartbeat_interval_ms": 50, "heartbeat_timeout_ms": args.hang_timeout_ms,
            "restart": "process start -> first token of `resilient-ep serve --engine "
                       "vllm` (vllm serve), every start of the run"},
        "samples": {"crash_stall_ms": crash_ms, "crash_detect_ms": [d * 1000 for d in detects],
                    "restart_s": restart, "overhead_ratios": ratios,
                    "hang_stall_ms": [h * 1000 for h in hang_stalls],
                    "hang_detect_ms": [d * 1000 for d in hang_detects],
                    "readmitted": readmitted, "outputs_equal": equal, "requests_lost": lost,
                    "failures": trial_detail},
    }
    if contexts:
        res["contexts"] = contexts
        res["outputs_equal"] = res["outputs_equal"] and all(
            c.get("crash_outputs_equal") and c.get("hang_outputs_equal") for c in contexts.values())
    return res


def _context_lengths(raw) -> list[int]:
    if not raw:
        return []
    try:
        out = [int(x) for x in str(raw).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--context must be comma-separated token counts, got {raw!r}") from None
    if any(x < 1 for x in out):
        raise ValueError(f"--context lengths must be >= 1, got {raw!r}")
    return out


def run_logged(run_fn, args: argparse.Namespace) -> dict:
    """``run_fn(args, log=...)`` with progress on stderr under ``--json`` (stdout then carries
    one JSON object, printed here) and on stdout otherwise."""
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    res = run_fn(args, log=log)
    if args.json:
        print(json.dumps(res))
    return res


def main(args: argparse.Namespace) -> int:
    res = run_logged(run, args)
    if not args.json:
        print_summary(res)
    return 0 if res["outputs_equal"] else 1


def print_summary(res: dict) -> None:
    """The human-readable lines of a result (``run``)."""
    print(f"throughput ratio on/off   {res['overhead_ratio']:.3f}")
    print(f"crash stall               median {res['crash_stall_ms_median']:.0f} ms, "
          f"p99 {res['crash_stall_ms_p99']:.0f} ms (failed over in "
          f"{res['crash_detect_ms_median']:.0f} ms)")
    print(f"outputs equal             {res['outputs_equal']} "
          f"({res.get('requests_lost', 0)} request(s) lost)")
    print(f"full restart              median {res['restart_s_median']:.1f} s "
          f"({res['restart_over_crash_stall']:.0f}x the crash stall)")
    print(f"hang stall                median {res['hang_stall_ms_median']:.0f} ms "
          f"(fenced after {res['hang_detect_ms_median']:.0f} ms)")
    for length, c in res.get("contexts", {}).items():
        print(f"context {length:>6} tokens: crash stall {c['crash_stall_ms']:.0f} ms, hang "
              f"stall {c['hang_stall_ms']:.0f} ms, survivor recomputed "
              f"{c['crash_survivor_requests_recomputed']} request(s), re-admitted restored "
              f"{c['crash_readmitted_tokens_restored']} / recomputed "
              f"{c['crash_readmitted_tokens_recomputed']} tokens, on/off "
              f"{c.get('overhead_ratio', float('nan')):.3f}, CPU/token on/off "
              f"{c.get('cpu_per_token_ratio', float('nan')):.3f}")
