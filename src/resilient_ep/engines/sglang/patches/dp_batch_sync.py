"""DP attention's per-step batch-size sync over the live ranks (failover path; ``HookRegistry``
hooks, not a ledger entry).

Why: before every step each attention-DP rank shares its batch facts (token counts, forward
mode, ...) with the others (``dp_attn.MLPSyncBatchInfo.all_gather`` ->
``exchange_sync_rows``, a gloo all-gather over the TP group's CPU group). With a dead rank
it raises or hangs, and no rank can run a step.

How: AROUND hooks (SGLang's ``HookRegistry``):
- ``exchange_sync_rows``: for the TP group of a failover-enabled instance, every live rank's
  row over the scheduler's failover group (:mod:`..groups`); a dead rank's row keeps SGLang's
  idle fallback, and SGLang masks it again through ``tp_group.active_ranks_cpu``, which our
  listeners keep (``scheduler.py``);
- ``SchedulerDPAttnAdapter.prepare_mlp_sync_batch``: a sync that lost a peer
  (:class:`~resilient_ep.transport.group.PeerLost`) is run again among the survivors (its
  inputs are unchanged).
"""

from __future__ import annotations

from resilient_ep.transport.group import is_peer_lost

from . import check_version, expect_signature, hooks_installed, install_hooks, unwrapped

NAME = "sglang-dp-batch-sync"
TARGET_MODULE = "sglang.srt.managers.scheduler_components.dp_attn"
_ROWS = f"{TARGET_MODULE}.exchange_sync_rows"
_SYNC = f"{TARGET_MODULE}.SchedulerDPAttnAdapter.prepare_mlp_sync_batch"
MAX_RESYNCS = 64


def _module():
    import sglang.srt.managers.scheduler_components.dp_attn as m

    return m



def check() -> None:
    check_version(NAME)
    m = _module()
    expect_signature(NAME, unwrapped(m.exchange_sync_rows), ("global_flat", "local_row", "group"))
    expect_signature(NAME, unwrapped(m.SchedulerDPAttnAdapter.prepare_mlp_sync_batch),
                     ("self", "local_batch"))


def exchange_sync_rows(original, global_flat, local_row, group):
    from sglang.srt.runtime_context import get_parallel

    from .tp_collectives import live_group_for

    tp = get_parallel().tp_group
    g = live_group_for(tp) if group is tp.cpu_group else None
    if g is None:
        return original(global_flat, local_row, group)
    got = g.allgather([local_row.contiguous()])
    rows = global_flat.view(g.size, local_row.numel())
    for r, (row,) in got.items():
        rows[r].copy_(row.view(-1))
    return None


def prepare_mlp_sync_batch(original, self, local_batch):
    from ..groups import COUNTERS

    for attempt in range(MAX_RESYNCS + 1):
        try:
            return original(self, local_batch)
        except Exception as e:
            if not is_peer_lost(e) or attempt == MAX_RESYNCS:
                raise
            COUNTERS["sync_reruns"] += 1


HOOKS = ((_ROWS, exchange_sync_rows, "AROUND"), (_SYNC, prepare_mlp_sync_batch, "AROUND"))


def is_applied() -> bool:
    return hooks_installed(HOOKS)


def apply() -> None:
    install_hooks(NAME, HOOKS)
