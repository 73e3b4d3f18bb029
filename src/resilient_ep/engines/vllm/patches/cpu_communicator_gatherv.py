"""Ledger entry ``vllm-cpu-communicator-gatherv`` (patches/vllm-cpu-communicator-gatherv.md).

Why: ``CpuCommunicator`` (vllm/distributed/device_communicators/cpu_communicator.py) inherits
``all_gatherv`` and ``reduce_scatterv`` from ``DeviceCommunicatorBase``, where both raise
``NotImplementedError``. ``AgRsAll2AllManager.dispatch`` / ``combine`` (the only all-to-all the
CPU backend offers) call exactly these, so data parallelism + ``--enable-expert-parallel`` dies
on the first forward (vllm-cpu 0.32.0).

How: implement both with plain torch.distributed collectives on the communicator's
``device_group`` (gloo on the CPU): ``all_gatherv`` pads every rank's rows to the largest
size, all-gathers, and cuts the padding; ``reduce_scatterv`` all-reduces the whole tensor and
keeps this rank's rows (gloo has no reduce-scatter). Results equal the NCCL versions'.
"""

from __future__ import annotations

from . import PatchError, check_version, expect_signature, is_marked, mark

NAME = "vllm-cpu-communicator-gatherv"
TARGET_MODULE = "vllm.distributed.device_communicators.cpu_communicator"


def _classes():
    from vllm.distributed.device_communicators.base_device_communicator import (
        DeviceCommunicatorBase,
    )
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    return DeviceCommunicatorBase, CpuCommunicator


def check() -> None:
    check_version(NAME)
    base, cpu = _classes()
    expect_signature(NAME, base.all_gatherv, ("self", "input_", "dim", "sizes"))
    expect_signature(NAME, base.reduce_scatterv, ("self", "input_", "dim", "sizes"))
    for attr in ("all_gatherv", "reduce_scatterv"):
        own = cpu.__dict__.get(attr)
        if own is not None and not is_marked(own, NAME):
            raise PatchError(f"{NAME}: CpuCommunicator.{attr} now exists upstream; drop this "
                             f"patch (patches/{NAME}.md)")


def is_applied() -> bool:
    _, cpu = _classes()
    return all(is_marked(cpu.__dict__.get(a), NAME) for a in ("all_gatherv", "reduce_scatterv"))


def gatherv(input_, sizes, rank: int, world_size: int, group):
    """All-gather rows of variable count: ``input_`` [sizes[rank], ...] -> [sum(sizes), ...]."""
    import torch
    import torch.distributed as dist

    if sizes is None:
        sizes = [input_.shape[0]] * world_size
    assert len(sizes) == world_size, f"{len(sizes)} sizes for {world_size} ranks"
    assert input_.shape[0] == sizes[rank], f"{input_.shape[0]} rows, sizes[{rank}]={sizes[rank]}"
    most = max(sizes)
    padded = input_.new_zeros((most,) + tuple(input_.shape[1:]))
    padded[: input_.shape[0]].copy_(input_)
    out = input_.new_empty((world_size * most,) + tuple(input_.shape[1:]))
    dist.all_gather_into_tensor(out, padded, group=group)
    if all(s == most for s in sizes):
        return out
    return torch.cat([out[r * most : r * most + s] for r, s in enumerate(sizes)])


def scatterv(input_, sizes, rank: int, world_size: int, group):
    """Sum over ranks, keep this rank's rows: [sum(sizes), ...] -> [sizes[rank], ...]."""
    import torch.distributed as dist

    if sizes is None:
        assert input_.shape[0] % world_size == 0
        sizes = [input_.shape[0] // world_size] * world_size
    assert len(sizes) == world_size and input_.shape[0] == sum(sizes), (sizes, input_.shape)
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    start = sum(sizes[:rank])
    return total[start : start + sizes[rank]].contiguous()


def all_gatherv(self, input_, dim: int = 0, sizes=None):
    """``CpuCommunicator.all_gatherv``: one tensor or a list, rows on dim 0."""
    import torch

    if dim != 0:
        raise NotImplementedError("only dim 0 all-gatherv is supported")
    one = isinstance(input_, torch.Tensor)
    outs = [gatherv(t, sizes, self.rank_in_group, self.world_size, self.device_group)
            for t in ([input_] if one else input_)]
    return outs[0] if one else outs


def reduce_scatterv(self, input_, dim: int = -1, sizes=None):
    """``CpuCommunicator.reduce_scatterv``."""
    if dim < 0:
        dim += input_.dim()
    moved = input_.movedim(dim, 0)
    out = scatterv(moved, sizes, self.rank_in_group, self.world_size, self.device_group)
    return out.movedim(0, dim).contiguous()


def apply() -> None:
    base, cpu = _classes()
    if is_applied():
        return
    cpu.all_gatherv = mark(all_gatherv, NAME, base.all_gatherv)
    cpu.reduce_scatterv = mark(reduce_scatterv, NAME, base.reduce_scatterv)
