"""``resilient-ep chaos``: random failures under streaming load from a real OpenAI client,
and a report that says whether anything was lost.

One run:

1. an instance starts behind its OpenAI-compatible server (the reference runtime here, vLLM
   with ``--engine vllm``: ``apps/chaos/vllm.py``);
2. a failure-free pass answers every prompt of a seeded workload (text prompts and token-id
   prompts of random lengths, random ``max_tokens``): the outputs every later answer must equal;
3. clients (the ``openai`` package, streaming and not) send those prompts without pause, while
   ``--events`` random events are drawn (seeded) at random moments, each only when the instance
   can take it (at least ``min_live`` ranks stay live, rank deaths are ``--death-gap-s`` apart):

   ==============  ==========================================================================
   ``kill``        SIGKILL a live rank (a crash)
   ``stop``        SIGSTOP a live rank, SIGCONT it after a random pause, shorter or longer than
                   the hang timeout (a pause that is waited out, or a hang that is fenced and
                   taken back)
   ``pause``       SIGSTOP a live rank for well under the hang timeout (nobody is lost: the
                   others wait), drawn even when no rank may die
   ``kill-worker`` / ``stop-worker`` / ``pause-worker``  the same on one worker process
                   (engines that have them)
   ``rejoin``      a lost rank comes back without a restart (engines that support it)
   ``forge``       a burst of forged packets at the instance's sockets (garbage, truncated
                   frames, well-formed messages signed with a wrong key that would declare a
                   live rank dead or a dead one alive): the membership must not change
   ``poison``      a request that kills every rank it runs on (an injected fault): it must fail
                   with a clear error at ``recovery.max_request_failures`` deaths
   ``bad-input``   a request the API must refuse (400 naming the field) before a rank sees it
   ==============  ==========================================================================

4. the load stops; every answer is compared with the failure-free pass.

The report (``--json``: JSON on stdout) counts events, requests, requests lost (errors and
time-outs of ordinary requests), completions equal to the failure-free run, the longest stall a
client saw between two tokens, poison requests failed cleanly, bad inputs refused and
membership changes caused by forged packets. Exit status 0 when nothing was lost, every answer
was exact, every poison request and bad input was handled and no forged packet changed anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("reference", "vllm"), default="reference")
    p.add_argument("--events", type=int, default=100, help="random events (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--model", help="checkpoint directory (default: the tiny model, built once)")
    p.add_argument("--ranks", type=int, default=None,
                   help="ranks (reference: 4; vllm: DP ranks, 4)")
    p.add_argument("--clients", type=int, default=6, help="concurrent OpenAI clients")
    p.add_argument("--prompts", type=int, default=24, help="prompts in the workload")
    p.add_argument("--min-live", type=int, default=2, help="never fewer live ranks than this")
    p.add_argument("--death-gap-s", type=float, default=3.0,
                   help="at least this long between two rank deaths")
    p.add_argument("--hang-timeout-ms", type=float, default=1000.0,
                   help="detector.heartbeat_timeout_ms of the instance")
    p.add_argument("--time-limit-s", type=float, default=1800.0, help="stop drawing events after")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a resilience configuration field")
    p.add_argument("--enforce-eager", action="store_true",
                   help="vllm: pass --enforce-eager (default: vLLM's default, torch.compile)")


def main(args: argparse.Namespace) -> int:
    from ...runtime.model import MoEConfig
    from ...runtime.workload import ensure_model

    log = (lambda *a, **k: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a, **k: print(*a, flush=True))
    if args.events < 0:
        raise ValueError(f"events must be >= 0, got {args.events}")
    model = ensure_model(args.model, quiet=args.json)
    if args.engine == "vllm":
        from .vllm import VllmTarget

        work = Path(tempfile.mkdtemp(prefix="rep-chaos-"))
        target = VllmTarget(model, dp=args.ranks or 4, work=work, settings=args.set,
                            hang_timeout_ms=args.hang_timeout_ms, log=log,
                            compile=not args.enforce_eager)
    else:
        from .reference import ReferenceTarget

        target = ReferenceTarget(model, ranks=args.ranks or 4, settings=args.set,
                                 hang_timeout_ms=args.hang_timeout_ms)
    vocab = MoEConfig.from_dir(model).vocab_size
    from .run import run_chaos, summary

    try:
        report = run_chaos(target, events=args.events, seed=args.seed, clients=args.clients,
                           prompts=args.prompts, min_live=args.min_live,
                           death_gap_s=args.death_gap_s, time_limit_s=args.time_limit_s,
                           vocab=vocab, log=log)
    finally:
        target.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(summary(report))
    return 0 if report["ok"] else 1
