"""Command-line helpers the engine launchers share (``resilient-ep serve --engine ...``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["flag_value", "cpu_thread_binding", "strip_engine"]


def flag_value(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last of ``names`` on a command line (``--flag v`` or ``--flag=v``)."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def cpu_thread_binding(num_workers: int, cpus: Sequence[int] | None = None) -> str:
    """An OpenMP thread binding (``0-3|4-7``) giving each of ``num_workers`` local workers its
    own CPUs, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` and SGLang's
    ``SGLANG_CPU_OMP_THREADS_BIND`` take it.

    ``cpus`` defaults to the CPUs this process may run on. With more workers than CPUs,
    workers share CPUs round-robin (slow, but it runs): 2 CPUs, 4 workers -> ``0|1|0|1``.
    """
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
            range(os.cpu_count() or 1))
    cpus = list(cpus)
    if num_workers <= 0:
        raise ValueError(f"num_workers ({num_workers}) must be > 0")
    if num_workers >= len(cpus):
        return "|".join(str(cpus[i % len(cpus)]) for i in range(num_workers))
    per, extra = divmod(len(cpus), num_workers)
    groups, start = [], 0
    for i in range(num_workers):
        n = per + (1 if i < extra else 0)
        group = cpus[start:start + n]
        start += n
        contiguous = group == list(range(group[0], group[-1] + 1))
        groups.append(f"{group[0]}-{group[-1]}" if contiguous and n > 1 else ",".join(map(str, group)))
    return "|".join(groups)


def strip_engine(argv: Sequence[str], engine: str) -> list[str]:
    """``argv`` without ``--engine NAME`` / ``--engine=NAME`` (resilient-ep's own flag); a
    name other than ``engine`` is an error (this launcher runs ``engine``)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--engine":
            if i + 1 < len(argv) and argv[i + 1] != engine:
                raise SystemExit(f"resilient-ep serve: this launcher runs {engine}, "
                                 f"not {argv[i + 1]}")
            skip = True
            continue
        if arg.startswith("--engine="):
            continue
        out.append(arg)
    return out
