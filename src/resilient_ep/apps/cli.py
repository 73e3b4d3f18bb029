"""The ``resilient-ep`` command. Subcommands import their modules lazily so that
``resilient-ep plan`` does not pay for the runtime, and the core never imports an engine."""

from __future__ import annotations

import argparse
import sys

from .. import __version__


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resilient-ep",
                                description="Resilience layer for expert-parallel MoE inference.")
    p.add_argument("--version", action="version", version=f"resilient-ep {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from . import plan
    plan.add_arguments(sub.add_parser(
        "plan", help="placement report: balancedness and survival, ours vs load-only"))

    mm = sub.add_parser("make-model", help="build a tiny random-weight Qwen3-MoE checkpoint")
    mm.add_argument("dir", help="output directory (config.json, safetensors, tokenizer)")
    mm.add_argument("--layers", type=int, default=2)
    mm.add_argument("--experts", type=int, default=8)
    mm.add_argument("--top-k", type=int, default=2)
    mm.add_argument("--hidden", type=int, default=128)
    mm.add_argument("--seed", type=int, default=0)

    from . import demo, server  # argument definitions only; heavy imports are lazy
    demo.add_arguments(sub.add_parser(
        "demo", help="4 ranks, a streaming workload, one rank killed mid-run (the main job)"))
    server.add_arguments(sub.add_parser(
        "serve", help="OpenAI-compatible server on the reference runtime "
                      "(--engine vllm / sglang: run the engine's server with the plugin)"))

    from . import chaos
    chaos.add_arguments(sub.add_parser(
        "chaos", help="random failures under streaming OpenAI load; reports what was lost"))

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    from . import bench_failover
    bench_failover.add_arguments(bsub.add_parser(
        "failover", help="throughput on/off, crash and hang stalls, full-restart baseline"))
    from . import bench_kv
    bench_kv.add_arguments(bsub.add_parser(
        "kv", help="KV checkpoints: throughput on/off, restore vs recompute, recomputed tokens"))
    from . import bench_repair
    bench_repair.add_arguments(bsub.add_parser(
        "repair", help="expert coverage repair on vLLM: time and MiB/s per source, memory"))
    from . import bench_rejoin
    bench_rejoin.add_arguments(bsub.add_parser(
        "rejoin", help="a lost vLLM engine rank respawns and rejoins: survivors' pause, time "
                       "to full size"))
    return p


EXTRAS = {"tokenizers": "runtime", "safetensors": "runtime", "transformers": "runtime",
          "matplotlib": "runtime", "fastapi": "runtime", "uvicorn": "runtime",
          "starlette": "runtime", "openai": "runtime", "simpy": "sim", "vllm": "vllm",
          "sglang": "sglang"}
"""Optional imports -> the extra of ``pyproject.toml`` that brings them."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers (they pass engine arguments through untouched).
    if argv and argv[0] == "simulate":
        from ..sim.cli import main as simulate_main
        return simulate_main(argv[1:])
    if argv and argv[0] == "serve" and _engine(argv) not in (None, "reference"):
        engine = _engine(argv)
        if engine == "sglang":
            from ..engines.sglang.launcher import main as sglang_main
            return sglang_main(argv[1:])
        if engine != "vllm":
            print(f"resilient-ep serve: error: --engine must be reference, vllm or sglang, "
                  f"got {engine!r}", file=sys.stderr)
            return 2
        from ..engines.vllm.launcher import main as vllm_main
        return vllm_main(argv[1:])
    if argv and argv[0] == "bench" and _engine(argv) not in (None, "reference", "vllm", "sglang"):
        print(f"resilient-ep bench: error: --engine must be reference, vllm or sglang, "
              f"got {_engine(argv)!r}", file=sys.stderr)
        return 2
    if not (argv and argv[0] in ("bench", "chaos")):  # these take --engine themselves
        argv = _strip_engine(argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            from . import plan
            return plan.main(args)
        if args.command == "make-model":
            from ..runtime.model_builder import make_model
            path = make_model(args.dir, seed=args.seed, num_layers=args.layers,
                              num_experts=args.experts, top_k=args.top_k, hidden_size=args.hidden)
            print(path)
            return 0
        if args.command == "demo":
            from . import demo
            return demo.main(args)
        if args.command == "serve":
            from . import server
            return server.main(args)
        if args.command == "chaos":
            from . import chaos
            return chaos.main(args)
        if args.command == "bench" and args.bench == "rejoin":
            from . import bench_rejoin
            return bench_rejoin.main(args)
        if args.command == "bench" and args.bench == "repair":
            from . import bench_repair
            return bench_repair.main(args)
        if args.command == "bench" and args.bench == "kv":
            from . import bench_kv
            return bench_kv.main(args)
        if args.command == "bench":
            from . import bench_failover
            return bench_failover.main(args)
    except ValueError as e:
        print(f"resilient-ep {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"resilient-ep {args.command}: needs {e.name}, part of the {extra!r} extra: "
              f"pip install 'resilient-ep[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def _engine(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--engine" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--engine="):
            return a.split("=", 1)[1]
    return None


def _strip_engine(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--engine":
            skip = True
            continue
        if not a.startswith("--engine="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
