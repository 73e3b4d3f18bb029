"""vLLM's configuration -> the core's neutral :class:`ResilienceConfig`.

Three ways in, all ending in ``VllmConfig.additional_config["resilience"]``:

- ``vllm serve MODEL --enable-resilience [--resilience-config FILE.yaml]
  [--resilience-set key.sub=value ...]`` (flags added by ``cli_args.py``);
- ``vllm serve MODEL --additional-config '{"resilience": {...}}'``;
- ``LLM(MODEL, additional_config={"resilience": {...}})``.

The ``resilience`` dict holds :class:`ResilienceConfig` fields plus two adapter keys:
``config_file`` (a YAML file, read in the front-end process) and ``overrides``
(``["key.sub=value", ...]``). :func:`normalize` resolves both in the front end and writes the
full, validated config back, so engine processes need neither the file nor the flags.
A ``resilience`` key that is absent, or ``{"enabled": false}``, leaves vLLM untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from resilient_ep.config import ConfigError, ResilienceConfig, refuse_unsupported

from ..common.settings import new_instance_id, resolve

__all__ = ["KEY", "UNSUPPORTED", "VllmTopology", "resilience_settings", "is_enabled", "normalize",
           "resilience_config", "topology"]

KEY = "resilience"


def resilience_settings(additional_config: Any) -> dict[str, Any] | None:
    """The raw ``resilience`` dict of an ``additional_config`` (None when absent)."""
    if not additional_config:
        return None
    if not isinstance(additional_config, dict):
        raise ConfigError("additional_config", additional_config, "must be a mapping")
    raw = additional_config.get(KEY)
    if raw is None:
        return None
    if raw is True:  # {"resilience": true}: on with defaults
        return {}
    if raw is False:
        return {"enabled": False}
    if not isinstance(raw, dict):
        raise ConfigError(KEY, raw, "must be a mapping (or true/false)")
    return raw


def is_enabled(additional_config: Any) -> bool:
    raw = resilience_settings(additional_config)
    return raw is not None and raw.get("enabled", True) is not False


def resilience_config(additional_config: Any) -> ResilienceConfig | None:
    """Validated config from an ``additional_config``; None when resilience is off."""
    return resolve(resilience_settings(additional_config), key=KEY)


log = logging.getLogger("vllm." + __name__)

UNSUPPORTED: dict[str, str] = {
    "transport.address": "vLLM's failover groups use Unix sockets within one host (TCP only "
                         "across nodes, with transport.node_addresses)",
    "kv_checkpoint.max_stall_ms": "the vLLM connector never holds decoding back for a save",
    "recovery.migrate_requests": "vLLM always re-admits a lost rank's requests on the survivors",
    "recovery.max_failures": "vLLM serves on until one engine rank is left",
    "recovery.readmit_fenced": "vLLM never re-admits a fenced rank (it is killed)",
    "transport.authenticate": "vLLM's instance always authenticates its sockets",
    "transport.curve": "vLLM's instance always uses CURVE where libzmq has it",
}
"""``ResilienceConfig`` keys the vLLM adapter does not read: set away from their default,
they are refused at start (``config.refuse_unsupported``), never silently ignored."""


def normalize(additional_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Resolve file and overrides in place; returns the additional_config (None if off).
    Settings vLLM does not implement are refused here, naming the key."""
    cfg = resilience_config(additional_config)
    if cfg is None:
        return None
    unsupported = dict(UNSUPPORTED)
    if cfg.transport.node_addresses:  # across nodes: TCP (multinode.py)
        unsupported.pop("transport.address")
    refuse_unsupported(cfg, "vllm", unsupported)
    if cfg.recovery.on_uncovered == "fail":
        raise ConfigError("recovery.on_uncovered", "fail",
                          "is not supported on vllm (a token routed to an expert with no live "
                          "copy waits for its repair, or is dropped from its top-k); use wait "
                          "or degrade")
    assert additional_config is not None
    raw = resilience_settings(additional_config) or {}
    out = cfg.to_dict()
    # Names this instance's private sockets (the engines' failover groups); the same in every
    # process because the engine processes receive this dict from the front end.
    out["instance"] = str(raw.get("instance") or new_instance_id())
    if raw.get("shadow_slots") is not None:  # decided once by the process that made it
        out["shadow_slots"] = int(raw["shadow_slots"])
    additional_config[KEY] = out
    return additional_config


@dataclass(frozen=True)
class VllmTopology:
    """The parallel layout of one vLLM instance, in the core's terms.

    ``ep_size`` ranks hold experts: rank ``dp_rank * tp_size + tp_rank`` for every data-parallel
    engine (``dp_size`` of them) and tensor-parallel worker (``tp_size`` each), as vLLM's
    ``--enable-expert-parallel`` lays them out. ``num_redundant_experts`` physical slots beyond
    the logical experts serve as replicas.
    """

    dp_size: int
    tp_size: int
    pp_size: int
    expert_parallel: bool
    num_redundant_experts: int

    @property
    def ep_size(self) -> int:
        return self.dp_size * self.tp_size if self.expert_parallel else 1

    def ep_rank(self, dp_rank: int, tp_rank: int) -> int:
        return dp_rank * self.tp_size + tp_rank if self.expert_parallel else 0


def topology(vllm_config: Any) -> VllmTopology:
    """Read the parallel layout from a ``VllmConfig`` (or anything with ``parallel_config``)."""
    pc = vllm_config.parallel_config
    eplb = getattr(pc, "eplb_config", None)
    return VllmTopology(
        dp_size=int(pc.data_parallel_size),
        tp_size=int(pc.tensor_parallel_size),
        pp_size=int(pc.pipeline_parallel_size),
        expert_parallel=bool(pc.enable_expert_parallel),
        num_redundant_experts=int(getattr(eplb, "num_redundant_experts", 0) or 0),
    )
