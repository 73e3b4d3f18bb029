#!/usr/bin/env bash
# Set up and run the whole test suite: unit and integration tests in .venv, then the real
# vLLM engine tests in .venv-vllm and the real SGLang engine tests in .venv-sglang (skip both
# with RESILIENT_EP_SKIP_ENGINES=1, or one with RESILIENT_EP_SKIP_VLLM=1 /
# RESILIENT_EP_SKIP_SGLANG=1).
# pytest's exit code 5 ("no tests collected") counts as success for a group; any other
# non-zero code fails the run.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
status=0

run_group() {  # name, python, pytest args...
  local name="$1" py="$2"; shift 2
  echo "=== $name: pytest $*"
  local t0=$(date +%s)
  "$py" -m pytest "$@"
  local rc=$?
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 )) s"
  if [[ $rc -ne 0 && $rc -ne 5 ]]; then status=1; fi
}

bash ci/setup.sh || exit 1
dirs=(); for d in tests/unit tests/integration tests/gpu; do [[ -d $d ]] && dirs+=("$d"); done
run_group core .venv/bin/python -q "${dirs[@]}"

if [[ "${RESILIENT_EP_SKIP_ENGINES:-0}" != 1 && "${RESILIENT_EP_SKIP_VLLM:-0}" != 1 && -d tests/engines/vllm ]]; then
  if bash ci/setup-vllm.sh; then
    run_group vllm .venv-vllm/bin/python -q tests/engines/vllm
  else
    echo "=== vllm: setup failed"; status=1
  fi
fi

if [[ "${RESILIENT_EP_SKIP_ENGINES:-0}" != 1 && "${RESILIENT_EP_SKIP_SGLANG:-0}" != 1 && -d tests/engines/sglang ]]; then
  if bash ci/setup-sglang.sh; then
    run_group sglang .venv-sglang/bin/python -q tests/engines/sglang
  else
    echo "=== sglang: setup failed"; status=1
  fi
fi
exit $status
