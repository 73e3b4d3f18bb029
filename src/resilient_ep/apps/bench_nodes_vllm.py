"""``resilient-ep bench failover --engine vllm --nodes 2``: real vLLM (DP=2 + EP) across two
"nodes" of a network test bed (root; ``resilient_ep.netbed``): DP rank 0 and the API servers on
node 0, ``--headless`` DP rank 1 on node 1, ``--enable-resilience`` with
``transport.node_addresses``.

(a) steady state across a slow link: completions throughput with 10 ms added each way
    (20 ms RTT) over the same instance without it, alternating; fences counted (false ones);
(b) node lost: every process of node 1 SIGKILLed mid-stream: when the head failed DP rank 1
    over (``failovers[0].detected_monotonic``), the longest pause of any stream after it
    (the stall), the stall beyond the failover;
(c) partition: node 1's cable cut mid-stream, mended after three heartbeat timeouts: when
    the head fenced DP rank 1, the stall, and how long after the cable came back node 1
    learned of the fence and stopped its rank.
Every stream of (b) and (c) is compared with the failure-free streams of the same instance.
Each part starts one instance (about 2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from .bench_failover_vllm import _stall_s, _stream_detail

__all__ = ["NodeServer", "start_instance", "run", "main"]

BASE_PORT = 25000
DELAY_MS = 10.0
PROMPTS = ["the cat sat on the", "one two three", "i want to go home", "we say that the world"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeServer:
    """``resilient-ep serve --engine vllm`` on one node of a bed, in its own process group;
    its HTTP port is on the node's loopback (call from a thread in ``bed.entered(node)``)."""

    def __init__(self, bed, node: int, model, args: list[str], log: Path, env: dict):
        self.model, self.log_path, self.port = str(model), Path(log), _free_port()
        self._f = open(log, "w")
        cmd = [*bed.prefix(node), sys.executable, "-m", "resilient_ep.cli", "serve", str(model),
               "--engine", "vllm", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout_s: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as r:
            return r.status, r.read()

    def status(self) -> dict:
        return json.loads(self.get("/resilience/status")[1])

    def wait_ready(self, timeout_s: float, other=None) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            for p in (self, other):
                if p is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"a server exited rc={p.proc.returncode}:\n{p.tail()}")
            try:
                if self.get("/health", 2)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"not ready after {timeout_s} s:\n{self.tail()}")

    def complete(self, prompt: str, max_tokens: int) -> list[int]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return list(json.loads(r.read())["choices"][0]["token_ids"])

    def stream(self, prompt: str, max_tokens: int, out: dict) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        out["tokens"], out["times"] = [], []
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    ids = choice.get("token_ids") or []
                    out["tokens"] += ids
                    out["times"] += [time.monotonic()] * len(ids)
        except Exception as e:  # recorded
            out["error"] = repr(e)

    def tail(self, n: int = 4000) -> str:
        self._f.flush()
        return self.log_path.read_text()[-n:]

    def stop(self) -> None:
        import signal

        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        self._f.close()


def engine_env(cpus: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", VLLM_CPU_OMP_THREADS_BIND=cpus)
    env.pop("RESILIENT_EP_VLLM_ACTIVE", None)
    return env


def start_instance(bed, model, work: Path, *, hang_timeout_ms: float, max_model_len: int = 1100,
                   rpc_port: int = 13345) -> tuple[NodeServer, NodeServer]:
    """DP rank 0 (and the API servers) on node 0, DP rank 1 headless on node 1."""
    from ..transport import wire

    key = work / "instance.key"
    key.unlink(missing_ok=True)
    wire.new_key_file(key)  # the instance key, at the same path on every node
    common = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
              "--max-num-seqs", "8", "--seed", "0", "--enable-expert-parallel",
              "--data-parallel-size", "2", "--data-parallel-size-local", "1",
              "--data-parallel-address", bed.address(0), "--data-parallel-rpc-port", str(rpc_port),
              "--enable-resilience",
              "--resilience-set", "transport.address=tcp",
              "--resilience-set", f"transport.node_addresses=[{', '.join(bed.addresses)}]",
              "--resilience-set", f"transport.base_port={BASE_PORT}",
              "--resilience-set", f"transport.key_file={key}",
              "--resilience-set", f"detector.heartbeat_timeout_ms={hang_timeout_ms}"]
    cpus = os.sched_getaffinity(0)
    first, last = str(min(cpus)), str(max(cpus))
    head = NodeServer(bed, 0, model, common, work / "head.log", engine_env(first))
    node = NodeServer(bed, 1, model, [*common, "--headless", "--data-parallel-start-rank", "1"],
                      work / "node1.log", engine_env(last))
    return head, node


def _streams(server: NodeServer, max_tokens: int, fail=None):
    outs = [dict() for _ in PROMPTS]
    threads = [threading.Thread(target=server.stream, args=(p, max_tokens, o))
               for p, o in zip(PROMPTS, outs)]
    for t in threads:
        t.start()
    at = None
    if fail is not None:
        end = time.monotonic() + 300
        while time.monotonic() < end and not all(len(o.get("tokens", ())) >= 8 for o in outs):
            time.sleep(0.005)
        at = time.monotonic()
        fail()
    for t in threads:
        t.join(timeout=600)
    return outs, at


def _throughput(server: NodeServer, n: int, max_tokens: int) -> float:
    outs = [None] * n
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(
        i, server.complete(PROMPTS[i % len(PROMPTS)], max_tokens))) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return sum(len(o or ()) for o in outs) / (time.perf_counter() - t0)


def steady_state(model, work, args, log) -> dict:
    from ..netbed import NetBed

    with NetBed(2, link="emulated") as bed:
        head, node = start_instance(bed, model, work / "steady", hang_timeout_ms=args.timeout_ms)
        try:
            with bed.entered(0):
                log(f"steady state: instance up in {head.wait_ready(args.start_timeout, node):.0f} s")
                _throughput(head, 8, 16)  # warm up
                fast, slow = [], []
                for i in range(args.throughput_runs):
                    for delay in ((0.0, DELAY_MS) if i % 2 == 0 else (DELAY_MS, 0.0)):
                        for n in range(2):
                            bed.impair(n, delay_ms=delay)
                        (slow if delay else fast).append(_throughput(head, 8, args.max_tokens))
                    log(f"steady state pair {i + 1}: {fast[-1]:.0f} tok/s, with 20 ms RTT "
                        f"{slow[-1]:.0f} tok/s")
                status = head.status()
        finally:
            head.stop()
            node.stop()
    return {"ratio_20ms_rtt": statistics.median(slow) / statistics.median(fast),
            "tok_s_no_delay": fast, "tok_s_20ms_rtt": slow,
            "false_fences": len(status.get("failovers", [])),
            "link": "emulated (userspace TUN forwarder; this kernel has no sch_netem)"}


def failure(model, work, args, log, *, partition: bool) -> dict:
    from ..netbed import NetBed

    name = "partition" if partition else "node_killed"
    with NetBed(2) as bed:
        head, node = start_instance(bed, model, work / name, hang_timeout_ms=args.timeout_ms)
        mended = {}
        try:
            with bed.entered(0):
                log(f"{name}: instance up in {head.wait_ready(args.start_timeout, node):.0f} s")
                clean, _ = _streams(head, args.stream_tokens)

                def fail():
                    if not partition:
                        bed.kill_node(1)
                        return
                    bed.set_link(1, up=False)

                    def mend():
                        bed.set_link(1, up=True)
                        mended["at"] = time.monotonic()
                    threading.Timer(args.timeout_ms / 1000 * 3, mend).start()

                failed, at = _streams(head, args.stream_tokens, fail=fail)
                status = head.status()
            node_stopped = None
            if partition:
                end = time.monotonic() + 120
                while node.proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.05)
                if node.proc.poll() is not None and "at" in mended:
                    node_stopped = time.monotonic() - mended["at"]
        finally:
            head.stop()
            node.stop()
    every = status.get("failovers", [])
    events = [e for e in every if e["detected_monotonic"] >= at]  # the failure's, not before
    detect = (events[0]["detected_monotonic"] - at) if events else None
    stall = _stall_s(failed, at)
    out = {"failed_over_after_ms": None if detect is None else round(detect * 1000, 1),
           "stall_ms": round(stall * 1000, 1),
           "stall_beyond_failover_ms": None if detect is None else round((stall - detect) * 1000, 1),
           "streams_equal": all(a.get("tokens") == b.get("tokens") and "error" not in b
                                for a, b in zip(clean, failed)),
           "requests_lost": sum("error" in b for b in failed),
           "false_fences_before_the_failure": len(every) - len(events),
           "failovers": every, "ranks": status["ranks"],
           "streams": [_stream_detail(o, at) for o in failed]}
    if partition:
        out["node1_stopped_its_rank_after_mend_ms"] = (None if node_stopped is None
                                                       else round(node_stopped * 1000, 1))
    log(f"{name}: failed over after {out['failed_over_after_ms']} ms, stall {out['stall_ms']} ms, "
        f"streams equal {out['streams_equal']}")
    return out


def run(args: argparse.Namespace, log=print) -> dict:
    from ..netbed import netbed_available
    from ..runtime.workload import ensure_model

    why = netbed_available()
    if why is not None:
        raise ValueError(f"--nodes runs on a network test bed, which {why}")
    if args.nodes != 2:
        raise ValueError(f"--nodes: only 2 is measured, got {args.nodes}")
    args.timeout_ms = getattr(args, "nodes_hang_timeout_ms", None) or 2000.0
    args.max_tokens = args.max_tokens or 64
    args.stream_tokens = 600
    model = ensure_model(args.model, quiet=args.json)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rep-bench-nodes-"))
    for sub in ("steady", "node_killed", "partition"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    res = {"engine": "vllm", "nodes": 2, "setup": {
        "dp": 2, "ep": True, "dp_size_local": 1, "heartbeat_interval_ms": 50,
        "heartbeat_timeout_ms": args.timeout_ms, "lease_ms": "= heartbeat timeout",
        "delay_ms_each_way": DELAY_MS, "stream_tokens": args.stream_tokens,
        "throughput_max_tokens": args.max_tokens, "workdir": str(work)}}
    res["steady_state"] = steady_state(model, work, args, log)
    res["node_killed"] = failure(model, work, args, log, partition=False)
    res["partition"] = failure(model, work, args, log, partition=True)
    res["machine"] = {"cpus": os.cpu_count(), "loadavg_start": load0,
                      "loadavg_end": os.getloadavg()}
    return res


def main(args: argparse.Namespace) -> int:
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    res = run(args, log=log)
    if args.json:
        print(json.dumps(res))
        return 0
    s, k, p = res["steady_state"], res["node_killed"], res["partition"]
    print(f"steady state, 20 ms RTT / none   {s['ratio_20ms_rtt']:.3f} ({s['false_fences']} false fences)")
    print(f"node killed                      failed over after {k['failed_over_after_ms']} ms, "
          f"stall {k['stall_ms']} ms; streams equal {k['streams_equal']}")
    print(f"partition                        fenced after {p['failed_over_after_ms']} ms, stall "
          f"{p['stall_ms']} ms; node 1 stopped its rank {p['node1_stopped_its_rank_after_mend_ms']} "
          f"ms after the cable came back; streams equal {p['streams_equal']}")
    return 0
