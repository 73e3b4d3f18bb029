#!/usr/bin/env bash
# The multi-node test bed by hand (root): network namespaces joined by a switch, each a
# "node" with its own address (10.213.0.<i+1>). The tests make their own beds through the
# same code (resilient_ep.netbed, fixture `netbed` in tests/integration/conftest.py).
#
#   bash ci/netns.sh up [--nodes 3] [--link emulated --delay-ms 10 --loss 0.01]   # until Ctrl-C
#   bash ci/netns.sh list
#   bash ci/netns.sh cleanup      # beds left behind by killed runs
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$ROOT/.venv/bin/python" -m resilient_ep.netbed "$@"
