"""Start and stop real SGLang servers and engines for the tests: bounded waits, loopback
only, every process group killed in a finalizer."""

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

from resilient_ep.engines.common.procs import free_port, kill_group, signal_pid

HERE = Path(__file__).resolve().parent
PROMPTS = ["the cat sat on the", "a new world is", "one two three four", "the system program",
           "people say that the", "water and fire are"]
MAX_TOKENS = 16
DP_ARGS = ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention", "--ep-size", "2"]
COMMON_ARGS = ["--dtype", "float32", "--mem-fraction-static", "0.3", "--max-total-tokens",
               "4096", "--max-running-requests", "16", "--random-seed", "0",
               "--log-level", "info"]



def engine_env(trace: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "SGLANG_USE_CPU_ENGINE": "1"})
    for k in ("RESILIENT_EP_SGLANG", "RESILIENT_EP_PLUGIN_TRACE", "SGLANG_PLUGINS"):
        env.pop(k, None)
    if trace is not None:
        env["RESILIENT_EP_PLUGIN_TRACE"] = str(trace)
    env.update(extra or {})
    return env


def run_engine(model: Path, out: Path, *, env: dict[str, str], extra: dict | None = None,
               timeout_s: float = 600) -> dict:
    """``engine_run.py`` in a child process (its own session): greedy ids of ``PROMPTS`` and
    the titles of the engine's processes."""
    cmd = [sys.executable, str(HERE / "engine_run.py"), str(model), str(out),
           json.dumps(extra or {})]
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        kill_group(proc)
        log.close()
    if rc != 0 or not out.exists():
        tail = out.with_suffix(".log").read_text()[-4000:]
        raise AssertionError(f"engine run failed (rc={rc}):\n{tail}")
    return json.loads(out.read_text())


class Server:
    """``resilient-ep serve MODEL --engine sglang ...`` in its own session."""

    def __init__(self, model: Path, workdir: Path, args: list[str], *, tag: str,
                 env: dict[str, str] | None = None, timeout_s: float = 600):
        self.model, self.port = str(model), free_port()
        self.log_path = workdir / f"serve-{tag}.log"
        cmd = [sys.executable, "-m", "resilient_ep.cli", "serve", self.model, "--engine",
               "sglang", "--port", str(self.port), *COMMON_ARGS, *args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env or engine_env(), start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 6000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-n:]

    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def status(self) -> dict:
        return self.get("/resilience/status")

    def generate_ids(self, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        """Greedy output ids from SGLang's native ``/generate``."""
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": max_tokens,
                                                    "ignore_eos": True}}
        req = urllib.request.Request(f"{self.url}/generate", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())["output_ids"]

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=300, max_retries=0)

    def stop(self) -> None:
        kill_group(self.proc)
        self.log.close()


def stream_all(server: Server, prompts: list[str], max_tokens: int, *,
               fail_pid: int | None = None, sig: int = signal.SIGKILL,
               after_tokens: int = 8, timeout_s: float = 300) -> list[dict]:
    """One ``openai`` streaming completion per prompt, concurrently. With ``fail_pid``, that
    process gets ``sig`` once every stream has ``after_tokens`` tokens (or one has ended).
    Returns per stream ``text`` (joined deltas), ``chunks``, ``finish``, ``error``."""
    client = server.client()
    outs = [{"text": "", "chunks": 0, "finish": None, "error": None} for _ in prompts]

    def one(i: int, prompt: str) -> None:
        try:
            stream = client.completions.create(model=server.model, prompt=prompt,
                                               max_tokens=max_tokens, temperature=0,
                                               stream=True)
            for chunk in stream:
                c = chunk.choices[0]
                outs[i]["text"] += c.text or ""
                outs[i]["chunks"] += 1
                outs[i]["finish"] = c.finish_reason or outs[i]["finish"]
        except Exception as e:  # recorded, asserted by the caller
            outs[i]["error"] = repr(e)

    threads = [threading.Thread(target=one, args=(i, p), daemon=True)
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    if fail_pid is not None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(o["chunks"] >= after_tokens for o in outs) or any(
                    o["finish"] or o["error"] for o in outs):
                break
            time.sleep(0.005)
        outs.append({"failed_at_chunks": [o["chunks"] for o in outs]})
        signal_pid(fail_pid, sig)
    for t in threads:
        t.join(timeout_s)
        if t.is_alive():
            raise AssertionError(f"a stream did not end within {timeout_s} s")
    return outs


def wait_for(pred, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
