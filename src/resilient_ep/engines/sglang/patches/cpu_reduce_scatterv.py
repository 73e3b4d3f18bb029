"""Ledger entry ``sglang-cpu-reduce-scatterv`` (patches/sglang-cpu-reduce-scatterv.md).

Why: with DP attention and expert parallelism over the whole TP group (``--tp N --dp N
--enable-dp-attention --ep N``, SGLang's wide-EP layout) each MoE layer returns its output to
the attention-DP ranks with ``GroupCoordinator.reduce_scatterv``
(``moe.utils.should_use_dp_reduce_scatterv``), which asserts a working pynccl communicator.
On the CPU there is none (``AttributeError: 'PyNcclCommunicator' object has no attribute
'device'``): the first forward pass of every such instance fails.

How: an AROUND hook (SGLang's ``HookRegistry``) on ``GroupCoordinator.reduce_scatterv``:
for a CPU tensor on a group without a usable pynccl communicator it runs SGLang's own
``_deterministic_reduce_scatterv`` (an all-reduce over the group's gloo group, then this
rank's rows: the path SGLang takes under ``SGLANG_ENABLE_DETERMINISTIC_INFERENCE``);
everything else goes to the original.
"""

from __future__ import annotations

from . import check_version, expect_signature, hook, hooked, unwrapped

NAME = "sglang-cpu-reduce-scatterv"
TARGET_MODULE = "sglang.srt.distributed.parallel_state"
TARGET = f"{TARGET_MODULE}.GroupCoordinator.reduce_scatterv"
_PARAMS = ("self", "input_", "output", "sizes")


def _cls():
    from sglang.srt.distributed.parallel_state import GroupCoordinator

    return GroupCoordinator



def check() -> None:
    check_version(NAME)
    cls = _cls()
    expect_signature(NAME, unwrapped(cls.reduce_scatterv), _PARAMS)
    expect_signature(NAME, cls._deterministic_reduce_scatterv, _PARAMS)


def is_applied() -> bool:
    return hooked(TARGET, reduce_scatterv_cpu)


def _no_pynccl(group) -> bool:
    comm = getattr(group, "pynccl_comm", None)
    return comm is None or getattr(comm, "disabled", True)


def reduce_scatterv_cpu(original, self, input_, output=None, sizes=None):
    if input_.is_cpu and _no_pynccl(self):
        return self._deterministic_reduce_scatterv(input_, output, sizes)
    return original(self, input_, output, sizes)


def apply() -> None:
    hook(NAME, TARGET, reduce_scatterv_cpu, "AROUND")
