"""Which vLLM instance this process belongs to, and where that instance's private sockets
and files live.

``--enable-resilience`` gives every instance an id (``additional_config["resilience"]
["instance"]``, written by the front end, so every process of one instance and no other
agrees on it). Its directory ``$TMPDIR/resilient-ep-<uid>/<instance>/`` holds the Unix
sockets of its failover groups (``groups.py``), its liveness socket and membership feed
(``liveness.py``), the fault-injection triggers (``faults.py``) and the instance key.

The directories are private: made mode 0700, and one that exists must belong to this user
(a directory another user planted is refused; one of ours made with the umask is tightened).
The first process of an instance to reach its directory makes the instance key there
(``instance.key``, 0600); every process of the instance then tags and checks every message
with it (``transport/wire.py``), so a process outside the instance can neither inject data nor
change membership. Across nodes (``transport.node_addresses``, ``multinode.py``) the sockets
are TCP at each rank's node address and the key is ``transport.key_file`` (or this
directory's ``instance.key``, copied to the other nodes); only the head makes a key.
"""

from __future__ import annotations

import os
from typing import Any

from resilient_ep.config import ResilienceConfig

from ..common.instance import _keyed, endpoints, instance_dir, join_instance  # noqa: F401
from .config import resilience_config, resilience_settings

__all__ = ["instance_of", "failover_enabled", "instance_dir", "join_instance", "endpoints"]


def instance_of(vllm_config: Any) -> tuple[ResilienceConfig, str] | None:
    extra = getattr(vllm_config, "additional_config", None)
    raw = resilience_settings(extra)
    if raw is None or not raw.get("instance"):
        return None  # off, or not normalized by our front end
    cfg = resilience_config(extra)
    if cfg is None:
        return None
    if cfg.transport.node_addresses:  # several hosts: where this instance's sockets live
        from . import multinode
        multinode.register(str(raw["instance"]), cfg, vllm_config.parallel_config)
    return cfg, str(raw["instance"])


def failover_enabled(vllm_config: Any) -> bool:
    """Resilience on, data parallel > 1 and expert parallel: the failover path applies."""
    if os.environ.get("RESILIENT_EP_VLLM_FAILOVER", "1") == "0":
        return False  # the benchmark's "off" arm: vLLM's own datapath, EP patches only
    pc = vllm_config.parallel_config
    return (instance_of(vllm_config) is not None and int(pc.data_parallel_size) > 1
            and bool(pc.enable_expert_parallel))
