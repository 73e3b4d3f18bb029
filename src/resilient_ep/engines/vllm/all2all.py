"""A MoE all-to-all for vLLM's data-parallel expert parallelism that survives a dead rank.

vLLM's CPU backend (and its ``naive`` / ``allgather_reducescatter`` backends) dispatch by an
all-gather of every DP rank's tokens and combine by a reduce-scatter, both gloo collectives on
the DP group: a dead rank makes them raise or hang. :class:`ResilientAll2AllManager` keeps the
same algorithm and the same tensor layout (ranks in order, each contributing the row count
vLLM's DP metadata gives it) but runs it over the worker failover group
(:mod:`.groups`): dead ranks contribute no rows (their count is 0 in the DP metadata, see the
``vllm-dp-batch-sync`` patch), and a rank lost mid-pass raises
:class:`~resilient_ep.transport.group.PeerLost`, which fails the step on every survivor so
the engine runs it again with the new membership.
"""

from __future__ import annotations

import torch
from vllm.distributed.device_communicators.all2all import AgRsAll2AllManager

from resilient_ep.transport.group import LiveGroup

__all__ = ["ResilientAll2AllManager"]


class ResilientAll2AllManager(AgRsAll2AllManager):
    def __init__(self, cpu_group, group: LiveGroup, tcp_store_group=None):
        super().__init__(cpu_group, tcp_store_group)
        self._group = group

    @property
    def group(self) -> LiveGroup:
        """The worker's failover group now (a rejoin switches it between two steps)."""
        from .groups import current_worker_group

        return current_worker_group() or self._group

    def _sizes(self, is_sequence_parallel: bool) -> list[int]:
        return list(self._get_sizes(0, self._get_comm_group(is_sequence_parallel)))

    def _gather(self, tensors: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
        got = self.group.allgather(tensors, strict=True)
        out = []
        for i, mine in enumerate(tensors):
            parts = [got[r][i] if r in got else mine.new_empty((0, *mine.shape[1:]))
                     for r in range(len(sizes))]
            for r, p in enumerate(parts):
                if p.shape[0] != (sizes[r] if r in got else 0):
                    raise RuntimeError(f"resilient all-gather: rank {r} sent {p.shape[0]} rows, "
                                       f"the DP metadata says {sizes[r]}")
            out.append(torch.cat([p.to(mine.device) for p in parts], dim=0))
        return out

    def dispatch_router_logits(self, hidden_states, router_logits, is_sequence_parallel=False,
                               extra_tensors=None):
        sizes = self._sizes(is_sequence_parallel)
        tensors = [hidden_states, router_logits, *(extra_tensors or [])]
        g = self._gather(tensors, sizes)
        if extra_tensors is not None:
            return g[0], g[1], g[2:]
        return g[0], g[1]

    def dispatch(self, hidden_states, topk_weights, topk_ids, is_sequence_parallel=False,
                 extra_tensors=None):
        sizes = self._sizes(is_sequence_parallel)
        tensors = [hidden_states, topk_weights, topk_ids, *(extra_tensors or [])]
        g = self._gather(tensors, sizes)
        if extra_tensors is not None:
            return g[0], g[1], g[2], g[3:]
        return g[0], g[1], g[2]

    def combine(self, hidden_states, is_sequence_parallel=False):
        sizes = self._sizes(is_sequence_parallel)
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        me = self.group.rank
        payloads = {r: [hidden_states[starts[r]:starts[r] + sizes[r]]]
                    for r in self.group.live}
        got = self.group.alltoall(payloads, strict=True)
        out = None
        for r in sorted(got):  # fixed order: the same sum on every run
            part = got[r][0].to(hidden_states.device)
            out = part.clone() if out is None else out.add_(part)
        assert out is not None and out.shape[0] == sizes[me]
        return out

    def allocate_combine_input(self, shape, dtype, device, is_sequence_parallel=False):
        return None

    def combine_into_output(self, hidden_states, output, is_sequence_parallel=False):
        output.copy_(self.combine(hidden_states, is_sequence_parallel))
        return output
