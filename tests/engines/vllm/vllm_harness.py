"""Start and stop real vLLM engines for the tests: bounded waits, loopback only, every
process group killed in a finalizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from resilient_ep.engines.common.procs import free_port, kill_group, signal_pid  # noqa: F401 (tests import them)

HERE = Path(__file__).resolve().parent
PROMPTS = ["the cat sat on the", "one two three", "i want to go home", "we say that the world"]
MAX_TOKENS = 24
# fp32 + eager: greedy tokens are identical across TP=1, TP=2+EP, DP=2+EP (bf16 drifts),
# and eager skips a ~60 s torch.compile warm-up per engine.
COMMON_ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512,
                 "max_num_seqs": 8, "seed": 0}



def engine_env(trace: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("RESILIENT_EP_VLLM_ACTIVE", None)
    if trace is not None:
        env["RESILIENT_EP_PLUGIN_TRACE"] = str(trace)
    env.update(extra or {})
    return env


def run_llm(model: Path, out: Path, log: Path, *, env: dict[str, str], timeout_s: float,
            **engine_kwargs) -> dict:
    """``LLM(model, **kwargs).generate(PROMPTS)`` in a fresh process; returns its JSON."""
    spec = {"model": str(model), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
            "engine": {**COMMON_ENGINE, **engine_kwargs}, "out": str(out)}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(HERE / "llm_run.py"), json.dumps(spec)],
                                stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_group(proc)
    if rc != 0 or not out.exists():
        tail = log.read_text()[-4000:]
        raise AssertionError(f"LLM run failed (rc={rc}), log tail:\n{tail}")
    return json.loads(out.read_text())


class Server:
    """``resilient-ep serve MODEL --engine vllm ...`` (what a user types) in its own process
    group."""

    def __init__(self, model: Path, args: list[str], log: Path, env: dict[str, str]):
        self.port = free_port()
        self.model = str(model)
        self.log = log
        cmd = [sys.executable, "-m", "resilient_ep.cli", "serve", str(model),
               "--engine", "vllm", "--port", str(self.port), *args]
        self._f = open(log, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.started_s: float | None = None
        self._t0 = t0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> float:
        deadline = self._t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited rc={self.proc.returncode}:\n{self.tail()}")
            try:
                if self.get("/health", timeout_s=2)[0] == 200:
                    self.started_s = time.monotonic() - self._t0
                    return self.started_s
            except OSError:
                pass
            time.sleep(1.0)
        raise AssertionError(f"server not ready after {timeout_s} s:\n{self.tail()}")

    def get(self, path: str, timeout_s: float = 30) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: dict, timeout_s: float = 120) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())

    def post_empty(self, path: str, timeout_s: float = 30) -> tuple[int, dict]:
        """POST with no body (``/resilience/ranks/{rank}/rejoin``): (HTTP status, JSON)."""
        req = urllib.request.Request(self.url + path, data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def complete(self, prompt: str) -> list[int]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        return list(self.post("/v1/completions", body)["choices"][0]["token_ids"])

    def tail(self, n: int = 4000) -> str:
        """The log's last ``n`` characters, without the access lines of status polls (a test
        that polls the status would show nothing else)."""
        self._f.flush()
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines()
                 if "GET /resilience/status" not in ln]
        return "\n".join(lines)[-n:]

    def stop(self) -> None:
        kill_group(self.proc)
        self._f.close()


def read_trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def process_title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].decode(errors="replace")


def stream_completion(server, prompt: str, max_tokens: int, out: dict,
                      dp_rank: int | None = None) -> None:
    """One streaming completion; records token ids, their arrival times, finish reason.
    ``dp_rank`` pins it to one engine rank (vLLM's ``X-data-parallel-rank`` header)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    headers = {"content-type": "application/json"}
    if dp_rank is not None:
        headers["X-data-parallel-rank"] = str(dp_rank)
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers=headers)
    out["tokens"], out["times"] = [], []
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                ids = choice.get("token_ids") or []
                out["tokens"] += ids
                out["times"] += [time.monotonic()] * len(ids)
                if choice.get("finish_reason"):
                    out["finish"] = choice["finish_reason"]
    except Exception as e:  # recorded, asserted by the test
        out["error"] = repr(e)


def stream_all(server, max_tokens: int, kill_pid: int | None = None, kill_signal: int = signal.SIGKILL,
               also_stop: tuple[int, ...] = (), min_tokens_before_kill: int = 8):
    """Stream every prompt at once; optionally signal ``kill_pid`` (and SIGSTOP ``also_stop``)
    once every stream has tokens. Returns the streams and the time of the signal."""
    outs = [dict() for _ in PROMPTS]
    threads = [threading.Thread(target=stream_completion, args=(server, p, max_tokens, o))
               for p, o in zip(PROMPTS, outs)]
    for t in threads:
        t.start()
    killed_at = None
    if kill_pid is not None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
                len(o.get("tokens", ())) >= min_tokens_before_kill for o in outs):
            time.sleep(0.02)
        assert all(len(o.get("tokens", ())) < max_tokens for o in outs), \
            "streams finished before the kill: raise max_tokens"
        killed_at = time.monotonic()
        signal_pid(kill_pid, kill_signal)
        for pid in also_stop:
            signal_pid(pid, signal.SIGSTOP)
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return outs, killed_at


