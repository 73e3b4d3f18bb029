"""``resilient-ep bench failover --engine sglang [--json]``: the failover benchmark on real
SGLang (``resilient-ep serve --engine sglang``, DP attention 2 + EP 2, the tiny fp32 model),
with the same arms, figures and JSON keys as the vLLM bench (``bench_failover_vllm.py``,
whose loop it runs with an SGLang server):

- **off**: the same instance with the failover path off (``RESILIENT_EP_SGLANG_FAILOVER=0``:
  SGLang's own gloo datapath and expert placement, plus only the patches its CPU backend
  needs for DP attention + EP), with the SGLang switches the failover path sets itself
  (``--enable-dp-lm-head --moe-dense-tp-size 1
  --enable-dp-attention-local-control-broadcast``), so that the ratio measures the layer,
  not SGLang's options — throughput;
- **on**: ``--enable-resilience`` — throughput, then a failure-free streamed run, then the
  same streams with scheduler rank 1 SIGKILLed mid-stream;
- **hang**: ``--enable-resilience`` — the same with scheduler rank 1 frozen (SIGSTOP),
  fenced after ``detector.heartbeat_timeout_ms`` (``--hang-timeout-ms``).

``restart_s``: process start -> first token of a completion (a full SGLang restart, what an
instance without this layer does after losing a rank), every server start of the run.
Token ids come from SGLang's native ``/generate`` (streamed: every chunk carries the ids so
far), so ``outputs_equal`` compares ids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path

from . import bench_failover_vllm as base

__all__ = ["SglangServer", "run", "main"]

SERVER_ARGS = ["--dtype", "float32", "--mem-fraction-static", "0.3", "--max-total-tokens",
               "8192", "--max-running-requests", "16", "--random-seed", "0", "--tp-size", "2",
               "--dp-size", "2", "--enable-dp-attention", "--ep-size", "2"]


OFF_ARGS = ["--enable-dp-lm-head", "--moe-dense-tp-size", "1",
            "--enable-dp-attention-local-control-broadcast"]
"""What the failover path sets on SGLang (``cli_args.prepare_record``), given to the off arm."""


class SglangServer(base._Server):
    """``resilient-ep serve --engine sglang`` with the methods the bench loop uses."""

    def __init__(self, model: Path, workdir: Path, resilience: bool, tag: str, timeout_s: float,
                 hang_timeout_ms: float = 1000.0, extra_args: list[str] | None = None,
                 base_args: list[str] | None = None):
        self.model, self.port = str(model), base._free_port()
        cfg = workdir / "resilience.yaml"
        cfg.write_text("resilience:\n  detector:\n    heartbeat_interval_ms: 50\n"
                       f"    heartbeat_timeout_ms: {hang_timeout_ms}\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        for k in ("RESILIENT_EP_SGLANG", "RESILIENT_EP_PLUGIN_TRACE"):
            env.pop(k, None)
        # Both arms run the plugin's CPU patches (SGLang cannot run DP attention + EP on the
        # CPU without them); "off" turns the failover path off.
        env["RESILIENT_EP_SGLANG_FAILOVER"] = "1" if resilience else "0"
        same_options = [] if resilience else OFF_ARGS
        cmd = [sys.executable, "-m", "resilient_ep.cli", "serve", self.model, "--engine",
               "sglang", "--port", str(self.port),
               *(SERVER_ARGS if base_args is None else base_args), *same_options,
               *(extra_args or []),
               "--resilience-config", str(cfg), "--log-level", "warning"]
        self.log = open(workdir / f"serve-sglang-{tag}.log", "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_ready(timeout_s)
            self.complete(base.PROMPTS[0], 1)
        except BaseException:
            self.stop()
            raise
        self.restart_s = time.monotonic() - self.t0

    def _generate(self, prompt: str, max_tokens: int, stream: bool):
        body = {"text": prompt, "stream": stream,
                "sampling_params": {"temperature": 0, "max_new_tokens": max_tokens,
                                    "ignore_eos": True}}
        req = urllib.request.Request(f"{self.url}/generate", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        return urllib.request.urlopen(req, timeout=600)

    def complete(self, prompt: str, max_tokens: int) -> list[int]:
        with self._generate(prompt, max_tokens, False) as r:
            return json.loads(r.read())["output_ids"]

    def stream(self, prompt: str, max_tokens: int, out: dict, dp_rank: int | None = None) -> None:
        out["tokens"], out["times"] = [], []
        try:
            with self._generate(prompt, max_tokens, True) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    ids = chunk.get("output_ids") or []
                    new = ids[len(out["tokens"]):]
                    out["tokens"] += new
                    out["times"] += [time.monotonic()] * len(new)
                    reason = (chunk.get("meta_info") or {}).get("finish_reason")
                    if reason:
                        out["finish"] = reason.get("type") if isinstance(reason, dict) else reason
        except Exception as e:
            out["error"] = repr(e)


def run(args: argparse.Namespace, log=print) -> dict:
    n = args.requests if args.requests is not None else 4
    max_tokens = args.max_tokens if args.max_tokens is not None else 256
    setup = {"dp_attention": 2, "tp": 2, "ep": 2, "expert_parallel": True, "requests": n,
             "max_tokens": max_tokens, "dtype": "float32", "cuda_graph": False,
             "heartbeat_interval_ms": 50, "heartbeat_timeout_ms": args.hang_timeout_ms,
             "placement_on": "the core's full mirror (16 physical slots for 8 experts)",
             "placement_off": "SGLang's trivial placement (8 slots)",
             "restart": "process start -> first token of `resilient-ep serve --engine sglang` "
                        "(sglang.launch_server), every start of the run"}
    if getattr(args, "context", None):
        raise ValueError("--context is not built for --engine sglang")
    return base.run(args, log, server_cls=SglangServer, engine="sglang", setup=setup)


def main(args: argparse.Namespace) -> int:
    res = base.run_logged(partial(run), args)
    if not args.json:
        base.print_summary(res)
    return 0 if res["outputs_equal"] else 1
