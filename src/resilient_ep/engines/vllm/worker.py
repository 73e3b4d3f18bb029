"""Worker-side half of the plugin: a vLLM ``worker_extension_cls``.

``--enable-resilience`` sets ``worker_extension_cls`` to :class:`ResilienceWorkerExtension`
(vLLM mixes it into its worker class, ``CPUWorker`` or ``GPUWorker``), so the API server can
ask every worker of every engine, through ``collective_rpc``, who it is and which experts it
holds. Method names start with ``resilient_ep_`` so they cannot clash with vLLM's own.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["ResilienceWorkerExtension", "local_experts_of"]


def _dense_digest(worker: Any) -> dict[str, Any]:
    from .experts import routed_param_ids
    from .weights_digest import digest

    runner = getattr(worker, "model_runner", None)
    model = runner.get_model() if runner is not None else None
    if model is None:
        return {"dense_digest": None, "dense_params": 0}
    return digest(model, routed_param_ids())


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
            "host": os.environ.get("VLLM_HOST_IP", ""),  # across nodes: whose pid it is
        }

    def resilient_ep_switch_groups(self, epoch: int, history: list[dict]) -> dict[str, Any]:
        """Between two steps, at a rejoin (``joining.py``): bring the expert maps to the
        membership of join ``epoch`` (a replacement replays the whole log ``history``; a
        survivor takes the joined ranks back), then run on the join's failover group."""
        from vllm.distributed import get_dp_group, get_tp_group

        from . import experts
        from .groups import is_solo, switch_worker_group

        dp, tp = get_dp_group(), get_tp_group()
        tp_size = int(tp.world_size)

        def ep_ranks_of(dp_rank: int) -> set[int]:
            return {dp_rank * tp_size + t for t in range(tp_size)}

        t0 = time.monotonic()
        state = experts.current()
        if state is not None and state.layers:
            if is_solo("worker"):
                state.replay(history, ep_ranks_of)
            else:
                joined = {int(e["rank"]) for e in history
                          if e["kind"] == "join" and int(e["epoch"]) == int(epoch)}
                state.set_joined(set().union(set(), *(ep_ranks_of(d) for d in joined)))
        t1 = time.monotonic()
        from .step_rerun import watch_next_passes

        watch_next_passes()
        group = switch_worker_group(self.vllm_config,  # type: ignore[attr-defined]
                                    int(epoch), int(dp.rank_in_group), int(dp.world_size),
                                    int(tp.rank_in_group))
        from .groups import switch_parts

        parts = {k: round(v, 2) if isinstance(v, float) else v
                 for k, v in switch_parts.get("worker", {}).items()}
        return {"epoch": int(epoch), "live": group.live, "experts_ms": (t1 - t0) * 1e3,
                "group_ms": (time.monotonic() - t1) * 1e3, "group_parts": parts,
                "experts_prepared": bool(state is not None and state.layers
                                         and state.last_join_prepared)}

    def resilient_ep_export_experts(self, dp_rank: int, root: str) -> dict[str, Any]:
        """A survivor's part of a rejoin of ``dp_rank``: write the experts its replacement
        will hold that this worker holds now into the export directory ``root`` (between two
        steps; ``experts.ExpertState.export``)."""
        from vllm.distributed import get_tp_group

        from . import experts

        state = experts.current()
        if state is None or not state.layers:
            return {"rank": None, "experts": [], "bytes": 0, "seconds": 0.0}
        tp_size = int(get_tp_group().world_size)
        return state.export({int(dp_rank) * tp_size + t for t in range(tp_size)}, root)

    def resilient_ep_verify(self, experts: bool = True) -> dict[str, Any]:
        """What a replacement checks before it joins: a digest of its dense (non-expert)
        weights, to compare with a survivor's (computed once per process: a survivor answers
        from its cache, between two steps), and with ``experts`` its expert slots against
        the host backup or the model files (bitwise)."""
        from . import experts as expert_state

        out: dict[str, Any] = {**_dense_digest(self), "pid": os.getpid()}
        state = expert_state.current()
        if experts and state is not None and state.layers:
            out["experts"] = state.verify()
        return out

    def resilient_ep_probe(self, wanted: list | None = None,
                           export_root: str | None = None) -> dict[str, Any]:
        """The probe forward of a rejoin (``probe.py``): the dense modules' fingerprints
        (cached) and the experts' (``wanted`` None: every expert this rank holds, as a
        replacement asks; else these ``[layer name, expert]`` pairs, as a survivor asks)."""
        from . import experts as expert_state
        from . import probe

        runner = getattr(self, "model_runner", None)
        model = runner.get_model() if runner is not None else None
        out: dict[str, Any] = {"pid": os.getpid(), "dense": {}, "skipped": {}}
        if model is not None:
            out.update(probe.dense_probe(model, expert_state.routed_param_ids()))
        state = expert_state.current()
        if state is not None and state.layers:
            pairs = None if wanted is None else [(str(n), int(e)) for n, e in wanted]
            out["experts"] = probe.expert_probe(state, pairs, export_root)
        return out

    def resilient_ep_counters(self) -> dict[str, Any]:
        """This worker's failover counters: in-place step re-runs and KV checkpoint traffic."""
        from .groups import current_worker_group
        from .step_rerun import COUNTERS

        from .step_rerun import JOIN_PASSES

        out: dict[str, Any] = {"pid": os.getpid(), **COUNTERS, "join_passes": list(JOIN_PASSES)}
        group = current_worker_group()
        if group is not None:  # the membership this worker's failover group runs by
            from .groups import incarnation, is_solo

            out["epoch"], out["live"] = group.epoch, group.live
            out["incarnation"], out["solo"] = incarnation("worker"), is_solo("worker")
            out["dropped"] = dict(group.dropped)
        from . import experts

        state = experts.current()
        if state is not None and state.layers:  # placement, coverage, repairs, shadows
            out["experts"] = state.status()
        try:
            from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

            if has_kv_transfer_group():
                stats = getattr(get_kv_transfer_group(), "stats", None)
                if isinstance(stats, dict):
                    out["kv"] = dict(stats)
        except ImportError:
            pass
        return out
