"""The failover groups of one vLLM instance: one :class:`~resilient_ep.transport.group.LiveGroup`
per process, among the data-parallel ranks.

- ``worker`` group (in each worker, one group per TP rank): the per-forward collectives that
  vLLM runs over gloo on the DP group (token counts, MoE all-gather / reduce-scatter). Strict:
  a lost member fails the forward pass on every survivor, which runs it again.
- ``core`` group (in each engine-core process): the "anyone still busy?" sum of the DP busy
  loop. Lenient: it completes over the live engines and never fails.

Endpoints are Unix sockets under ``$TMPDIR/resilient-ep-<uid>/<instance>/`` where
``instance`` is the id the front end wrote into ``additional_config["resilience"]``: every
process of one instance, and no other instance, agrees on it. (Single node: DP ranks on other
hosts need TCP endpoints, not built yet.)
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from resilient_ep.config import ResilienceConfig
from resilient_ep.transport.group import LiveGroup

from .config import resilience_config, resilience_settings

__all__ = ["instance_of", "endpoints", "worker_group", "core_group", "current_worker_group",
           "failover_enabled"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler

_worker: LiveGroup | None = None
_core: LiveGroup | None = None


def instance_of(vllm_config: Any) -> tuple[ResilienceConfig, str] | None:
    extra = getattr(vllm_config, "additional_config", None)
    raw = resilience_settings(extra)
    if raw is None or not raw.get("instance"):
        return None  # off, or not normalized by our front end
    cfg = resilience_config(extra)
    return (cfg, str(raw["instance"])) if cfg is not None else None


def failover_enabled(vllm_config: Any) -> bool:
    """Resilience on, data parallel > 1 and expert parallel: the failover path applies."""
    if os.environ.get("RESILIENT_EP_VLLM_FAILOVER", "1") == "0":
        return False  # the benchmark's "off" arm: vLLM's own datapath, EP patches only
    pc = vllm_config.parallel_config
    return (instance_of(vllm_config) is not None and int(pc.data_parallel_size) > 1
            and bool(pc.enable_expert_parallel))


def endpoints(instance: str, kind: str, size: int) -> list[str]:
    root = Path(tempfile.gettempdir()) / f"resilient-ep-{os.getuid()}" / instance
    root.mkdir(parents=True, exist_ok=True)
    return [f"ipc://{root}/{kind}-{r}" for r in range(size)]


def worker_group(vllm_config: Any, dp_rank: int, dp_size: int, tp_rank: int) -> LiveGroup:
    """This worker's group (created on first use)."""
    global _worker
    if _worker is None:
        cfg, instance = instance_of(vllm_config)
        _worker = LiveGroup(f"workers-tp{tp_rank}", dp_rank,
                            endpoints(instance, f"w{tp_rank}", dp_size), detector=cfg.detector,
                            tied_to_parent=_worker_has_engine_parent(vllm_config))
        from .beacon import DeathReporter

        # The front end owns the instance's membership: it hears of every death a worker
        # group sees (a frozen worker whose engine core still beacons, a killed worker whose
        # engine core has not exited yet) and fences that rank.
        _worker.add_listener(DeathReporter(instance, dp_rank))
        log.info("resilient-ep: worker failover group up (dp rank %d of %d)", dp_rank, dp_size)
    return _worker


def _worker_has_engine_parent(vllm_config: Any) -> bool:
    # The multiprocessing executor starts workers as children of the engine core; the "uni"
    # executor runs the worker inside it.
    return vllm_config.parallel_config.distributed_executor_backend != "uni"


def current_worker_group() -> LiveGroup | None:
    return _worker


def core_group(vllm_config: Any) -> LiveGroup:
    global _core
    if _core is None:
        pc = vllm_config.parallel_config
        cfg, instance = instance_of(vllm_config)
        _core = LiveGroup("engine-cores", int(pc.data_parallel_rank),
                          endpoints(instance, "core", int(pc.data_parallel_size)),
                          detector=cfg.detector)
    return _core
