"""Worker-side half of the plugin: a vLLM ``worker_extension_cls``.

``--enable-resilience`` sets ``worker_extension_cls`` to :class:`ResilienceWorkerExtension`
(vLLM mixes it into its worker class, ``CPUWorker`` or ``GPUWorker``), so the API server can
ask every worker of every engine, through ``collective_rpc``, who it is and which experts it
holds. Method names start with ``resilient_ep_`` so they cannot clash with vLLM's own.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ResilienceWorkerExtension", "local_experts_of"]


def local_experts_of(model: Any) -> list[list[int]]:
    """Global (physical) expert ids held by this worker, one list per MoE layer."""
    layers = []
    for module in model.modules():
        manager = getattr(module, "expert_map_manager", None)
        if manager is not None and hasattr(manager, "get_local_expert_ids"):
            layers.append([int(e) for e in manager.get_local_expert_ids()])
    return layers


class ResilienceWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    def resilient_ep_rank_info(self) -> dict[str, Any]:
        """Identity of this worker: ranks, pids and the experts it holds."""
        from .config import topology

        cfg = self.vllm_config  # type: ignore[attr-defined]
        pc = cfg.parallel_config
        topo = topology(cfg)
        dp_rank = int(pc.data_parallel_rank)
        try:
            from vllm.distributed import get_tensor_model_parallel_rank

            tp_rank = int(get_tensor_model_parallel_rank())
        except Exception:  # not initialised (never after model load)
            tp_rank = int(getattr(self, "rank", 0)) % max(topo.tp_size, 1)
        # The "uni" executor runs the worker inside the engine-core process; "mp" (the CPU
        # backend's choice even for TP=1) starts it as a child of the engine core.
        in_engine = pc.distributed_executor_backend == "uni"
        model = None
        runner = getattr(self, "model_runner", None)
        if runner is not None:
            get_model = getattr(runner, "get_model", None)
            model = get_model() if callable(get_model) else getattr(runner, "model", None)
        return {
            "dp_rank": dp_rank,
            "tp_rank": tp_rank,
            "ep_rank": topo.ep_rank(dp_rank, tp_rank),
            "pid": os.getpid(),
            "engine_pid": os.getpid() if in_engine else os.getppid(),
            "local_experts": local_experts_of(model) if model is not None else [],
        }

    def resilient_ep_counters(self) -> dict[str, Any]:
        """This worker's failover counters: in-place step re-runs and KV checkpoint traffic."""
        from .groups import current_worker_group
        from .step_rerun import COUNTERS

        out: dict[str, Any] = {"pid": os.getpid(), **COUNTERS}
        group = current_worker_group()
        if group is not None:  # the membership this worker's failover group runs by
            out["epoch"], out["live"] = group.epoch, group.live
            out["dropped"] = dict(group.dropped)
        try:
            from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

            if has_kv_transfer_group():
                stats = getattr(get_kv_transfer_group(), "stats", None)
                if isinstance(stats, dict):
                    out["kv"] = dict(stats)
        except ImportError:
            pass
        return out
