"""``--enable-resilience`` turns on KV checkpoints in vLLM, from ``kv_checkpoint.*``.

Where failover applies (resilience on, ``--data-parallel-size`` > 1,
``--enable-expert-parallel``) and ``kv_checkpoint.enabled`` is true, the engine gets the
project's connector (``kv_connector.py``) as its ``kv_transfer_config``, configured from the
same ``kv_checkpoint`` keys the reference runtime reads (interval, replicas, deadlines). The
front end then re-admits a dead rank's requests with ``resilient_restore`` so each resumes
from its newest verified checkpoint and recomputes only the tail.

Stores (``kv_checkpoint.store``): ``peer`` (the default: another engine rank's memory, each
engine core serving a store for its peers, so a checkpoint outlives its rank and its node),
host shared memory under ``/dev/shm/resilient-ep-<uid>/<instance>/`` (``shm``: engine ranks
of one host; outlives a rank, not the host) or files (``file``, ``kv_checkpoint.path``).

A user's own ``--kv-transfer-config`` is refused with a message that says how to keep it
(``kv_checkpoint.enabled=false``): two connectors would need vLLM's multi-connector, whose
ordering of loads we have not verified with ours.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from resilient_ep.config import ConfigError, ResilienceConfig

__all__ = ["CONNECTOR", "CONNECTOR_MODULE", "connector_extra_config", "kv_transfer_settings"]

log = logging.getLogger("vllm." + __name__)

CONNECTOR = "ResilientKVConnector"
CONNECTOR_MODULE = "resilient_ep.engines.vllm.kv_connector"


def connector_extra_config(cfg: ResilienceConfig, instance: str) -> dict[str, Any]:
    kv = cfg.kv_checkpoint
    store = kv.store
    common = {"store": store, "interval_tokens": kv.interval_tokens, "replicas": kv.replicas,
              "timeout_ms": kv.timeout_ms}
    if store == "peer":
        return {**common, "instance": instance}
    if store == "file":
        base = kv.path or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                       f"resilient-ep-{os.getuid()}", instance, "kv")
    else:
        base = f"/dev/shm/resilient-ep-{os.getuid()}/{instance}/kv"
    return {**common, "base_dir": base}


def is_ours(kv_transfer_config: Any) -> bool:
    if kv_transfer_config is None:
        return False
    get = kv_transfer_config.get if isinstance(kv_transfer_config, dict) else \
        lambda k, d=None: getattr(kv_transfer_config, k, d)
    return get("kv_connector") == CONNECTOR and get("kv_connector_module_path") == CONNECTOR_MODULE


def kv_transfer_settings(cfg: ResilienceConfig, instance: str, current: Any) -> Any:
    """What ``EngineArgs.kv_transfer_config`` should be; raises on a user's own connector."""
    from vllm.config import KVTransferConfig

    if not cfg.kv_checkpoint.enabled or is_ours(current):
        return current
    if current is not None:
        name = getattr(current, "kv_connector", None) if not isinstance(current, dict) \
            else current.get("kv_connector")
        raise ConfigError(
            "--kv-transfer-config", name,
            "is set, and --enable-resilience needs its own KV connector for checkpoints; "
            "set kv_checkpoint.enabled=false (--resilience-set kv_checkpoint.enabled=false) "
            "to keep yours (re-admitted requests are then recomputed)")
    return KVTransferConfig(kv_connector=CONNECTOR, kv_connector_module_path=CONNECTOR_MODULE,
                            kv_role="kv_both",
                            kv_connector_extra_config=connector_extra_config(cfg, instance))
