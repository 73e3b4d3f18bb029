"""The ``resilient-ep`` command. Subcommands import their modules lazily so that
``resilient-ep plan`` does not pay for the runtime, and the core never imports an engine."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resilient-ep",
                                description="Resilience layer for expert-parallel MoE inference.")
    p.add_argument("--version", action="version", version=f"resilient-ep {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from . import plan
    plan.add_arguments(sub.add_parser(
        "plan", help="placement report: balancedness and survival, ours vs load-only"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers (they pass engine arguments through untouched).
    if argv and argv[0] == "simulate":
        from .sim.cli import main as simulate_main
        return simulate_main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            from . import plan
            return plan.main(args)
    except ValueError as e:
        print(f"resilient-ep {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
