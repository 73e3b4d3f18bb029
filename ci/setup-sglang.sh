#!/usr/bin/env bash
# Create .venv-sglang: a CPU-only SGLang (issue 14) with resilient-ep installed editable.
#
#   bash ci/setup-sglang.sh [ROOT]     # ROOT/.venv-sglang, ROOT defaults to this checkout
#
# What upstream lacks on a CPU and this script supplies is in patches/sglang-cpu-install.md.
#
#   torch 2.13.0 (CPU build, from the local wheel pip finds via /opt/wheels)
#   sglang 0.5.23 (--no-deps) + its Requires-Dist minus the CUDA-only packages
#   torchvision 0.28.0 (the only torchvision for torch 2.13 on PyPI is a CUDA build: its C++ ops
#     cannot load against CPU torch, so torchvision/_meta_registrations.py is patched to skip them)
#   a sgl_kernel stub package (sglang-kernel has no CPU wheel on PyPI)
#
# Idempotent: a run that finds a working venv whose stamp matches exits in seconds.
# Env: PYTHON=python3.11 interpreter to use; SETUP_SGLANG_FORCE=1 rebuild from scratch;
#      SETUP_SGLANG_NICE=1 run pip under `nice -n 19 ionice -c3`.
set -Eeuo pipefail

SGLANG_VERSION=0.5.23
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
# CUDA/GPU-only requirements of sglang, as normalised names (regex, full match):
#  kernels and their toolchains that need an NVIDIA GPU / CUDA runtime, and torch add-ons pinned to
#  other torch releases (torchaudio==2.11.0, torchcodec==0.17.0 are built for other torch ABIs).
DROP_RE='cuda-python|flash-attn-4|flashinfer-python|humming-kernels|nvidia-cutlass-dsl|nvidia-mathdx|nvshmem4py-cu13|quack-kernels|sgl-deep-ep|sgl-deep-gemm|sgl-flash-mla|sglang-kernel|tilelang|torch-memory-saver|torchaudio|torchcodec|torch|torchvision'
# Needed although not (or not directly) in sglang's list: sglang.srt.utils.common imports triton
# unconditionally (it also comes in through xgrammar).
EXTRA_REQS=(triton)

T0=$(date +%s)
log() { STEP="$*"; echo "setup-sglang: $*"; }
STEP=start
die() { echo "setup-sglang: ERROR: $*" >&2; exit 1; }
trap 'rc=$?; echo "setup-sglang: ERROR: command failed (exit $rc) at line $LINENO during step [$STEP]: $BASH_COMMAND" >&2; [ -n "${PIPLOG:-}" ] && [ -s "$PIPLOG" ] && { echo "setup-sglang: last lines of $PIPLOG:" >&2; grep -v "is ignored: it is neither" "$PIPLOG" | tail -25 >&2; }; exit $rc' ERR

ROOT=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -d "$ROOT" ] || die "ROOT '$ROOT' is not a directory"
ROOT=$(cd "$ROOT" && pwd)
VENV=$ROOT/.venv-sglang
STAMP=$VENV/.setup-sglang.stamp
PIPLOG=$VENV/setup-sglang.log
SELF=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_SHA=$(sha256sum "$SELF" | cut -c1-16)

NICE=()
if [ "${SETUP_SGLANG_NICE:-0}" = 1 ]; then NICE=(nice -n 19); command -v ionice >/dev/null && NICE+=(ionice -c3); fi

# One run at a time per ROOT.
if command -v flock >/dev/null; then
  exec 9>"$ROOT/.venv-sglang.lock"
  flock -w 1800 9 || die "another setup-sglang.sh holds $ROOT/.venv-sglang.lock"
fi

PROJECT_SHA=$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)
EXPECTED_STAMP="sglang=$SGLANG_VERSION torch=$TORCH_VERSION+cpu torchvision=$TORCHVISION_VERSION sgl_kernel=stub script=$SCRIPT_SHA project=$PROJECT_SHA"

quick_check() {  # fast: metadata + stub + CPU torch + patched torchvision, no sglang import
  "$VENV/bin/python" - "$SGLANG_VERSION" "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'PY' >/dev/null 2>&1
import sys, importlib.metadata as md
sg, tv, tvv = sys.argv[1:]
assert md.version("sglang") == sg
assert md.version("torch").split("+")[0] == tv
assert md.version("torchvision").split("+")[0] == tvv
import sgl_kernel
assert getattr(sgl_kernel, "IS_STUB", False)
import torch
assert torch.version.cuda is None
import warnings; warnings.simplefilter("ignore")
import torchvision.transforms  # fails if torchvision was reinstalled without the patch
import resilient_ep
PY
}

if [ "${SETUP_SGLANG_FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$EXPECTED_STAMP" ]; then
  if quick_check; then
    log "$VENV is up to date ($EXPECTED_STAMP); nothing to do ($(( $(date +%s) - T0 )) s)"
    exit 0
  fi
  log "stamp matches but the quick check failed; repairing"
fi

# ---------------------------------------------------------------- python + venv
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 /root/.pyenv/versions/3.11.7/bin/python; do
    if command -v "$c" >/dev/null 2>&1; then PY=$(command -v "$c"); break; fi
  done
fi
[ -n "$PY" ] || die "no python3.11 found (set PYTHON=/path/to/python3.11)"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
  || die "$PY is not Python 3.11 (sglang $SGLANG_VERSION wheel is cp311)"

if [ "${SETUP_SGLANG_FORCE:-0}" = 1 ] && [ -d "$VENV" ]; then
  log "SETUP_SGLANG_FORCE=1: removing $VENV"
  rm -rf "$VENV"
fi
if [ -d "$VENV" ] && ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  log "$VENV exists but its python is broken; recreating"
  rm -rf "$VENV"
fi
if [ ! -d "$VENV" ]; then
  log "creating $VENV with $PY ($("$PY" -V 2>&1))"
  "$PY" -m venv "$VENV"
else
  log "reusing $VENV (no valid stamp); re-running the install steps"
fi
rm -f "$STAMP"
: > "$PIPLOG"
VPY=$VENV/bin/python
pip_() { "${NICE[@]}" "$VPY" -m pip --disable-pip-version-check "$@" >>"$PIPLOG" 2>&1; }

log "upgrading pip (log: $PIPLOG)"
pip_ install --upgrade "pip>=24" packaging

# ---------------------------------------------------------------- torch (CPU)
TORCH_SPEC="torch==$TORCH_VERSION"
for w in /opt/wheels/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*.whl; do [ -f "$w" ] && TORCH_SPEC=$w; done
log "installing torch: $TORCH_SPEC"
pip_ install "$TORCH_SPEC"
"$VPY" -W ignore - "$TORCH_VERSION" <<'PY' || die "the torch that pip installed is not the CPU build of $TORCH_VERSION (no local CPU wheel?); see $PIPLOG"
import sys, torch
want = sys.argv[1]
print(f"setup-sglang: torch {torch.__version__} cuda={torch.version.cuda}")
sys.exit(0 if torch.__version__.split("+")[0] == want and torch.version.cuda is None else 1)
PY

# ---------------------------------------------------------------- sglang wheel + its deps
DL=$(mktemp -d "${TMPDIR:-/tmp}/setup-sglang.XXXXXX")
trap 'rm -rf "$DL"' EXIT
log "downloading sglang==$SGLANG_VERSION wheel"
pip_ download --no-deps --only-binary=:all: -d "$DL" "sglang==$SGLANG_VERSION"
WHL=$(ls "$DL"/sglang-"$SGLANG_VERSION"-*.whl 2>/dev/null | head -n1)
[ -n "$WHL" ] || die "pip download did not produce a sglang $SGLANG_VERSION wheel; see $PIPLOG"

REQS=$DL/requirements-cpu.txt
"$VPY" - "$WHL" "$DROP_RE" "$REQS" <<'PY'
import re, sys, zipfile
from packaging.requirements import Requirement
whl, drop_re, out = sys.argv[1:]
drop = re.compile(drop_re)
with zipfile.ZipFile(whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
keep, dropped = [], []
for line in text.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    r = Requirement(line.split(":", 1)[1].strip())
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue  # extras and other platforms
    name = re.sub(r"[-_.]+", "-", r.name).lower()
    r.marker = None
    (dropped if drop.fullmatch(name) else keep).append(str(r))
open(out, "w").write("\n".join(keep) + "\n")
print(f"setup-sglang: {len(keep)} requirements kept, {len(dropped)} dropped: {' '.join(dropped)}")
PY
printf '%s\n' "${EXTRA_REQS[@]}" >>"$REQS"

log "installing $(wc -l <"$REQS") requirements + torchvision==$TORCHVISION_VERSION (torch pinned; several minutes)"
pip_ install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" -r "$REQS"
log "installing sglang $SGLANG_VERSION --no-deps"
pip_ install --no-deps --force-reinstall "$WHL"
"$VPY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)' \
  || die "the dependency install replaced the CPU torch with a CUDA build; see $PIPLOG"

SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# ---------------------------------------------------------------- torchvision patch
log "patching torchvision/_meta_registrations.py (nms/qnms fake kernels only when its C++ ops loaded)"
"$VPY" - "$SITE" <<'PY'
import sys, pathlib
p = pathlib.Path(sys.argv[1]) / "torchvision" / "_meta_registrations.py"
s = p.read_text()
n = 0
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    new = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))\n'
    if old in s:
        s = s.replace(old, new)
        n += 1
if n:
    p.write_text(s)
print(f"setup-sglang: torchvision patch: {n} decorator(s) patched"
      + ("" if n else " (already patched or not needed)"))
PY

# ---------------------------------------------------------------- sgl_kernel stub
if "$VPY" -m pip show -q sglang-kernel >/dev/null 2>&1; then
  die "a real sglang-kernel is installed in $VENV; refusing to overwrite it with the stub"
fi
log "writing the sgl_kernel stub to $SITE/sgl_kernel"
mkdir -p "$SITE/sgl_kernel"
cat >"$SITE/sgl_kernel/__init__.py" <<'SGLK_EOF'
"""CPU-only stand-in for ``sgl_kernel`` (the ``sglang-kernel`` wheel has no CPU build on PyPI).

Written by setup-sglang.sh.  ``import sgl_kernel`` and ``from sgl_kernel import <name>`` succeed
for any name; each name is a function that raises NotImplementedError naming the op when it is
*called*.  The submodules in ``STUB_SUBMODULES`` (imported unguarded on SGLang's CPU code path)
behave the same way.  Any other submodule (``sgl_kernel.scalar_type``, ``.kvcacheio``, ...) raises
ModuleNotFoundError, because SGLang wraps those imports in ``try/except ImportError`` and falls
back to pure-PyTorch code -- a stub there would break the fallback.  Nothing is registered under
``torch.ops.sgl_kernel`` (code that calls those gets torch's own AttributeError).
Set SGL_KERNEL_STUB_TRACE=1 to log each name looked up (to stderr).
"""
import importlib.abc
import importlib.machinery
import os
import sys

__version__ = "0.0.0+cpustub"
IS_STUB = True
# Imported without an ImportError guard under ``is_cpu()`` (GDN / KDA / Mamba attention).
STUB_SUBMODULES = frozenset({"mamba"})


def _make_op(qualname):
    def _stub_op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel stub: op '{qualname}' is not available in this CPU-only "
            "environment (the stub written by setup-sglang.sh has no kernels)"
        )

    _stub_op.__name__ = qualname.rsplit(".", 1)[-1]
    _stub_op.__qualname__ = _stub_op.__name__
    _stub_op.__module__ = qualname.rsplit(".", 1)[0]
    _stub_op._sgl_kernel_stub = True
    return _stub_op


def _module_getattr(modname):
    cache = {}

    def __getattr__(name):
        # Dunder / private probes (``__path__``, ``__wrapped__``, ``_fields`` ...) stay
        # AttributeError so that import machinery, inspect, pickle and mock keep working.
        if name.startswith("_"):
            raise AttributeError(f"module {modname!r} has no attribute {name!r}")
        if name not in cache:
            if os.environ.get("SGL_KERNEL_STUB_TRACE"):
                print(f"sgl_kernel stub: {modname}.{name} looked up (pid {os.getpid()})",
                      file=sys.stderr, flush=True)
            cache[name] = _make_op(f"{modname}.{name}")
        return cache[name]

    return __getattr__


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        module.__doc__ = f"sgl_kernel stub submodule {module.__name__}"
        module.IS_STUB = True
        module.__getattr__ = _module_getattr(module.__name__)


class _StubFinder(importlib.abc.MetaPathFinder):
    _loader = _StubLoader()

    def find_spec(self, fullname, path=None, target=None):
        prefix = __name__ + "."
        if fullname.startswith(prefix) and fullname[len(prefix):] in STUB_SUBMODULES:
            return importlib.machinery.ModuleSpec(fullname, self._loader)
        return None


if not any(type(f).__name__ == "_StubFinder" for f in sys.meta_path):
    sys.meta_path.append(_StubFinder())

__getattr__ = _module_getattr(__name__)
SGLK_EOF
find "$SITE/sgl_kernel" -name '__pycache__' -prune -exec rm -rf {} +

# ---------------------------------------------------------------- resilient-ep
log "installing resilient-ep from $REPO (editable; torch stays the CPU build)"
pip_ install -e "$REPO[test]" "torch==$TORCH_VERSION"

# ---------------------------------------------------------------- verify
log "pip check (only sglang's deliberately dropped requirements may be reported)"
PIPCHECK=$("$VPY" -m pip --disable-pip-version-check check 2>&1 | grep -v "is ignored: it is neither" || true)
UNEXPECTED=$(printf '%s\n' "$PIPCHECK" | grep -v -E "^sglang $SGLANG_VERSION (requires ($DROP_RE), which is not installed|has requirement torch==[^,]*, but you have torch $TORCH_VERSION\+cpu)\.?\$" | grep -v '^$' || true)
[ -z "$UNEXPECTED" ] || die "pip check reports unexpected problems:
$UNEXPECTED"

log "import check (sglang, Engine, scheduler, model runner, qwen3_moe, torchvision.transforms)"
SGLANG_USE_CPU_ENGINE=1 "${NICE[@]}" "$VPY" - <<'PY' >>"$PIPLOG" 2>&1 || die "import check failed; see the end of $PIPLOG"
import warnings; warnings.simplefilter("ignore")
import torch, torchvision, torchvision.transforms, sgl_kernel
from sgl_kernel import silu_and_mul
import sglang
from sglang.srt.entrypoints.engine import Engine
import sglang.srt.managers.scheduler, sglang.srt.model_executor.model_runner, sglang.srt.models.qwen3_moe
print("import check ok", sglang.__version__, torch.__version__, torchvision.__version__)
PY

VERSIONS=$("$VPY" - <<'PY'
import importlib.metadata as md
print(" ".join(f"{p}={md.version(p)}" for p in ("sglang", "torch", "torchvision", "triton", "transformers", "xgrammar")))
PY
)
{ echo "$EXPECTED_STAMP"; echo "installed: $VERSIONS"; echo "python: $("$VPY" -V 2>&1)"; echo "date: $(date -u +%FT%TZ)"; } >"$STAMP"
log "installed: $VERSIONS"
log "venv size: $(du -sh "$VENV" | cut -f1)"
log "done in $(( $(date +%s) - T0 )) s; activate with: source $VENV/bin/activate (and export SGLANG_USE_CPU_ENGINE=1)"
