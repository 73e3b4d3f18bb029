"""SGLang's TP-group collectives over the live ranks (failover path; a ``HookRegistry`` hook,
not a ledger entry).

Why: a DP-attention + EP instance runs collectives over its whole TP group on every step:
the token gather before each MoE layer (``all_reduce`` or ``all_gather_into_tensor``) and
the sum back to each rank's tokens after it (``reduce_scatter_tensor``, or ``all_reduce``:
on the CPU ``reduce_scatterv`` is an all-reduce, ledger ``sglang-cpu-reduce-scatterv``). On
the CPU they run over gloo, which raises or hangs for ever when one rank dies (and cannot
shrink).

How: AROUND hooks on those ``GroupCoordinator`` methods: for the coordinator(s) spanning the
scheduler processes of a failover-enabled instance (the TP group and any group over the
same ranks), the same collective runs over this scheduler's failover group
(:mod:`..groups`), among the live ranks. A dead rank contributes nothing (its token count is
0 in the batch-size sync, so its slot is empty) and its chunk of a gather is zero; sums run
in rank order, the same on every rank. A rank lost during a collective raises
:class:`~resilient_ep.transport.group.PeerLost` on every survivor, which re-runs its step
(``scheduler_failover.py``). Everything else goes to SGLang's code.
"""

from __future__ import annotations

import torch

from . import check_version, expect_signature, hooks_installed, install_hooks, unwrapped

NAME = "sglang-tp-collectives"
TARGET_MODULE = "sglang.srt.distributed.parallel_state"
_CLS = f"{TARGET_MODULE}.GroupCoordinator"
_SIGS = {
    "all_reduce": ("self", "input_"),
    "_all_reduce_in_place": ("self", "input_"),
    "all_gather_into_tensor": ("self", "output", "input"),
    "reduce_scatter_tensor": ("self", "output", "input"),
}


def _cls():
    from sglang.srt.distributed.parallel_state import GroupCoordinator

    return GroupCoordinator



def check() -> None:
    check_version(NAME)
    cls = _cls()
    for name, params in _SIGS.items():
        expect_signature(NAME, unwrapped(getattr(cls, name)), params)


def live_group_for(coordinator):
    """The failover group that carries ``coordinator``'s collectives, or None (SGLang's own)."""
    from ..instance import failover_on

    if not failover_on():
        return None
    from sglang.srt.runtime_context import get_parallel

    from ..groups import group

    p = get_parallel()
    tp = p.tp_group
    if coordinator.world_size != tp.world_size or list(coordinator.ranks) != list(tp.ranks):
        return None
    return group(p.tp_rank, p.tp_size)


def _sum(got: dict[int, list[torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """Every live rank's first tensor summed, in rank order (the same on every rank)."""
    out = None
    for r in sorted(got):
        t = got[r][0].to(like.dtype)
        out = t.clone() if out is None else out.add_(t)
    return out


def all_reduce(original, self, input_):
    g = live_group_for(self)
    if g is None:
        return original(self, input_)
    input_.copy_(_sum(g.allgather([input_.contiguous()]), input_).view_as(input_))
    return input_


def all_reduce_in_place(original, self, input_):
    g = live_group_for(self)
    if g is None:
        return original(self, input_)
    input_.copy_(_sum(g.allgather([input_.contiguous()]), input_).view_as(input_))
    return None


def all_gather_into_tensor(original, self, output, input):
    g = live_group_for(self)
    if g is None:
        return original(self, output, input)
    got = g.allgather([input.contiguous()])
    chunks = output.view(g.size, *input.shape)
    for r in range(g.size):
        if r in got:
            chunks[r].copy_(got[r][0].view_as(input))
        else:
            chunks[r].zero_()  # a dead rank: its slot holds no token
    return None


def reduce_scatter_tensor(original, self, output, input):
    g = live_group_for(self)
    if g is None:
        return original(self, output, input)
    n = output.numel()
    flat = input.contiguous().view(-1)
    payloads = {r: [flat[r * n:(r + 1) * n]] for r in g.live}
    got = g.alltoall(payloads)
    output.copy_(_sum(got, output).view_as(output))
    return output


HOOKS = tuple((f"{_CLS}.{name}", fn, "AROUND") for name, fn in (
    ("all_reduce", all_reduce), ("_all_reduce_in_place", all_reduce_in_place),
    ("all_gather_into_tensor", all_gather_into_tensor),
    ("reduce_scatter_tensor", reduce_scatter_tensor)))


def is_applied() -> bool:
    return hooks_installed(HOOKS)


def apply() -> None:
    install_hooks(NAME, HOOKS)
