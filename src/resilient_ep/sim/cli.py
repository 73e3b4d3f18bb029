"""``resilient-ep simulate SCENARIO.yaml [--json] [--plot out.png] [--policy NAME ...]
[--set KEY=VALUE ...]``.

Prints a table (or, with ``--json``, one JSON object ``{"scenario": ..., "policies": {...}}``)
and optionally writes a PNG of goodput over time for every policy. Exit status 2 for a bad
scenario file, with the offending key in the message.
"""

from __future__ import annotations

import argparse
import sys

from resilient_ep.sim.scenario import POLICY_NAMES, Scenario, ScenarioError

__all__ = ["main", "build_parser", "apply_overrides"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resilient-ep simulate",
        description="Simulate an EP instance under failures with every recovery policy.")
    p.add_argument("scenario", help="scenario YAML (see docs/simulator.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="PNG", help="write goodput over time to this PNG")
    p.add_argument("--policy", action="append", choices=POLICY_NAMES, metavar="NAME",
                   help=f"run only this policy (repeatable; one of {', '.join(POLICY_NAMES)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set workload.load_factor=0.5 "
                        "(repeatable; VALUE is parsed as YAML)")
    return p


def apply_overrides(sc: Scenario, items: list[str]) -> Scenario:
    """``dotted.key=value`` overrides (values parsed as YAML); errors name the key."""
    import yaml

    data = sc.to_dict()
    for item in items:
        if "=" not in item:
            raise ScenarioError("--set", item, "must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ScenarioError(".".join(parts[: depth + 1]), item, "unknown section")
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ScenarioError(key.strip(), raw, f"invalid YAML value ({e})") from None
    return Scenario.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sc = apply_overrides(Scenario.from_yaml(args.scenario), args.set)
    except ScenarioError as e:
        print(f"resilient-ep simulate: {args.scenario}: {e}", file=sys.stderr)
        return 2
    from resilient_ep.sim import report
    from resilient_ep.sim.run import simulate

    results = simulate(sc, args.policy)
    if args.json:
        print(report.to_json(sc, results))
    else:
        print(report.table(sc, results))
    if args.plot:
        path = report.plot(sc, results, args.plot)
        if not args.json:
            print(f"goodput plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
