"""``python -m resilient_ep.netbed`` (what ``ci/netns.sh`` runs):

- ``up [--nodes N] [--link bridge|emulated] [--delay-ms D] [--loss P]``: make a bed, print
  its namespaces and addresses, keep it until Ctrl-C (or SIGTERM), then remove it;
- ``cleanup``: remove beds left behind by runs that were killed;
- ``list``: the beds' namespaces that exist now.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .namespaces import NETNS_DIR, PREFIX, NetBed, cleanup_stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resilient_ep.netbed")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make a bed and keep it until interrupted")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--link", choices=("bridge", "emulated"), default="bridge")
    up.add_argument("--subnet", default="10.213.0")
    up.add_argument("--delay-ms", type=float, default=0.0, help="emulated: per node, egress")
    up.add_argument("--loss", type=float, default=0.0, help="emulated: per node, egress")
    sub.add_parser("cleanup", help="remove beds of runs that are gone")
    sub.add_parser("list", help="list the beds' namespaces")
    args = p.parse_args(argv)
    if args.cmd == "cleanup":
        for name in cleanup_stale():
            print(f"removed {name}")
        return 0
    if args.cmd == "list":
        if NETNS_DIR.is_dir():
            for path in sorted(NETNS_DIR.iterdir()):
                if path.name.startswith(PREFIX):
                    print(path.name)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with NetBed(args.nodes, link=args.link, subnet=args.subnet) as bed:
        if args.delay_ms or args.loss:
            for i in range(bed.nodes):
                bed.impair(i, delay_ms=args.delay_ms, loss=args.loss)
        for i in range(bed.nodes):
            print(f"node {i}: {bed.names[i]} {bed.address(i)}   "
                  f"run: ip netns exec {bed.names[i]} COMMAND", flush=True)
        print("up; Ctrl-C removes it", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
