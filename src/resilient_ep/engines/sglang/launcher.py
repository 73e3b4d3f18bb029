"""``resilient-ep serve MODEL --engine sglang [any sglang launch_server argument]``.

Runs SGLang's own server entry (what ``python -m sglang.launch_server`` runs) in this
process, with:

- ``MODEL`` (the first argument, when it is not a flag) as ``--model-path``;
- loopback by default: ``--host 127.0.0.1`` unless you pass ``--host``;
- on a machine whose torch has no CUDA (the CPU build): ``--device cpu``,
  ``SGLANG_USE_CPU_ENGINE=1``, and ``SGLANG_CPU_OMP_THREADS_BIND`` with one CPU group per
  scheduler process (TP x PP; with DP attention the DP ranks live inside the TP group),
  which SGLang requires for more than one scheduler on one NUMA node; where ``sgl_kernel`` is
  the stub of ``ci/setup-sglang.sh`` (no CPU kernels), ``--attention-backend torch_native``
  and the CUDA-graph runner off (``--cuda-graph-backend-decode disabled
  --cuda-graph-backend-prefill disabled``).

Anything you set yourself (environment or flags) wins. The resilience flags
(``--enable-resilience``, ``--resilience-config``, ``--resilience-set``) are SGLang flags
once the plugin is installed, so they pass through like any other.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import MutableMapping, Sequence

from ..common.launch import cpu_thread_binding, flag_value, strip_engine

__all__ = ["main", "server_argv", "prepare_environment", "cpu_only", "kernels_stubbed"]


def cpu_only() -> bool:
    """True when the installed torch has no CUDA (SGLang then runs on the CPU)."""
    import torch

    return torch.version.cuda is None and not torch.cuda.is_available()


def kernels_stubbed() -> bool:
    """True when ``sgl_kernel`` is the stub ``ci/setup-sglang.sh`` installs (no CPU ops)."""
    if importlib.util.find_spec("sgl_kernel") is None:
        return True
    import sgl_kernel

    return bool(getattr(sgl_kernel, "IS_STUB", False))


def _size(argv: Sequence[str], names: Sequence[str]) -> int:
    raw = flag_value(argv, names)
    return int(raw) if raw is not None else 1


def server_argv(argv: Sequence[str], *, cpu: bool | None = None,
                stub: bool | None = None) -> list[str]:
    """The ``sglang.launch_server`` arguments for ``resilient-ep serve`` arguments."""
    argv = list(argv)
    model = None
    if argv and not argv[0].startswith("-"):
        model, argv = argv[0], argv[1:]
    out = strip_engine(argv, "sglang")
    if flag_value(out, ("--model-path", "--model")) is None:
        if model is None:
            raise SystemExit("resilient-ep serve --engine sglang: give MODEL (or --model-path)")
        out = ["--model-path", model, *out]
    elif model is not None:
        raise SystemExit(f"resilient-ep serve: MODEL {model!r} and --model-path both given")
    if flag_value(out, ("--host",)) is None:
        out += ["--host", "127.0.0.1"]
    cpu = cpu_only() if cpu is None else cpu
    if cpu and flag_value(out, ("--device",)) is None:
        out += ["--device", "cpu"]
    stub = (cpu and kernels_stubbed()) if stub is None else stub
    if stub:
        if flag_value(out, ("--attention-backend",)) is None:
            out += ["--attention-backend", "torch_native"]
        if "--disable-cuda-graph" not in out:
            for phase in ("decode", "prefill"):
                if flag_value(out, (f"--cuda-graph-backend-{phase}",)) is None:
                    out += [f"--cuda-graph-backend-{phase}", "disabled"]
    return out


def prepare_environment(argv: Sequence[str], env: MutableMapping[str, str] | None = None,
                        cpu: bool | None = None) -> dict[str, str]:
    """Set what an SGLang run on this machine needs (only where unset); returns what it set."""
    env = os.environ if env is None else env
    cpu = cpu_only() if cpu is None else cpu
    wanted: dict[str, str] = {}
    if cpu:
        tp = _size(argv, ("--tensor-parallel-size", "--tp-size"))
        pp = _size(argv, ("--pipeline-parallel-size", "--pp-size"))
        wanted["SGLANG_USE_CPU_ENGINE"] = "1"
        if tp * pp > 1:
            wanted["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tp * pp)
    set_now = {}
    for key, value in wanted.items():
        if key not in env:
            env[key] = value
            set_now[key] = value
    return set_now


def main(argv: Sequence[str] | None = None) -> int:
    """``resilient-ep serve MODEL --engine sglang [sglang args]`` -> exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = server_argv(argv)
    prepare_environment(args)
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    try:
        server_args = prepare_server_args(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        run_server(server_args)
    except KeyboardInterrupt:
        return 130
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
