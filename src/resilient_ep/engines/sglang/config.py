"""SGLang's configuration -> the core's neutral :class:`ResilienceConfig`.

Ways in, all ending in one settings dict on the ``ServerArgs`` record (the attribute
``_resilience``, which SGLang pickles with the record into every process it starts):

- ``python -m sglang.launch_server ... --enable-resilience [--resilience-config FILE.yaml]
  [--resilience-set key.sub=value ...]`` (flags added through SGLang's ``HookRegistry``,
  ``cli_args.py``); ``resilient-ep serve MODEL --engine sglang ...`` passes them through;
- ``sglang.Engine(server_args=enable(ServerArgs(...), {...}))``: :func:`enable` on a record
  you build yourself (``Engine(**kwargs)`` builds its record inside, after the plugins load,
  so it cannot take a keyword SGLang does not know).

The dict holds :class:`ResilienceConfig` fields plus the adapter keys of
:mod:`resilient_ep.engines.common.settings` (``config_file``, ``overrides``). The front end
resolves and validates it once (:func:`normalize`: a bad value stops the launch, naming the
dotted field) before any SGLang subprocess starts, adds the instance id, and hands the result
to every process it starts through the environment (:data:`ENV`, JSON): scheduler and DP
controller processes read it there (:func:`from_env`) without the file or the flags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from resilient_ep.config import ConfigError, ResilienceConfig, refuse_unsupported

from ..common.settings import new_instance_id, resolve

__all__ = ["ATTR", "ENV", "KEY", "UNSUPPORTED", "SglangTopology", "enable", "attach",
           "settings_of",
           "normalize", "from_env", "export", "clear_env"]

KEY = "resilience"
ATTR = "_resilience"
"""Attribute of SGLang's ``ServerArgs`` holding the raw settings dict (a non-field, underscore
attribute: SGLang's record lets it be set at any time and pickles it to its subprocesses)."""

ENV = "RESILIENT_EP_SGLANG"
"""The normalized settings (JSON), set by the front end for the processes it starts."""

UNSUPPORTED: dict[str, str] = {
    "transport.address": "SGLang's failover groups use Unix sockets within one host",
    "transport.node_addresses": "SGLang runs on one node with resilience (across nodes: vLLM)",
    "transport.base_port": "SGLang's sockets are Unix sockets within one host",
    "transport.key_file": "SGLang's instance makes its own key in its private directory",
    "detector.lease_ms": "leases are for ranks on other nodes; SGLang runs on one node",
    "kv_checkpoint.max_stall_ms": "the SGLang checkpoints never hold decoding back for a save",
    "recovery.migrate_requests": "SGLang always re-admits a lost rank's requests on the survivors",
    "recovery.max_failures": "SGLang serves on until one rank is left",
    "recovery.readmit_fenced": "SGLang never re-admits a fenced rank (it is killed)",
    "recovery.respawn": "a lost SGLang rank does not rejoin (not built yet)",
    "transport.authenticate": "SGLang's instance always authenticates its sockets",
    "transport.curve": "SGLang's instance always uses CURVE where libzmq has it",
    "shadow": "shadow experts are not built on SGLang yet",
    "repair": "expert repair is not built on SGLang yet (the default full mirror needs none)",
    "placement.redundant_slots_per_rank": "SGLang runs the full mirror (every expert on two "
                                          "ranks); a smaller budget needs repair, not built yet",
}
"""``ResilienceConfig`` keys the SGLang adapter does not read: set away from their default,
they are refused at start (``config.refuse_unsupported``), never silently ignored."""


def _as_settings(value: Any) -> dict[str, Any] | None:
    if value is None or value is False:
        return None if value is None else {"enabled": False}
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(KEY, value, "must be a mapping (or true/false)")
    return dict(value)


def enable(server_args: Any, settings: Any = True) -> Any:
    """Turn resilience on for an unresolved SGLang ``ServerArgs`` (``settings``: True for the
    defaults, or a dict of :class:`ResilienceConfig` fields plus ``config_file`` /
    ``overrides``); returns ``server_args``. Validated at once (a bad value raises
    :class:`ConfigError` naming the field); where failover applies this also sets the SGLang
    arguments it needs (``cli_args.prepare_record``)."""
    attach(server_args, settings)
    from .cli_args import prepare_record

    prepare_record(server_args)
    return server_args


def attach(server_args: Any, settings: Any) -> None:
    """Put the raw settings on the record (no validation)."""
    setattr(server_args, ATTR, _as_settings(settings))


def settings_of(server_args: Any) -> dict[str, Any] | None:
    """The raw settings dict attached to ``server_args`` (None when off or absent)."""
    raw = getattr(server_args, ATTR, None)
    if raw is None or (isinstance(raw, dict) and raw.get("enabled", True) is False):
        return None
    return raw


def normalize(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Resolve file and overrides, validate, refuse what SGLang does not implement, add the
    instance id; the plain dict every process of the instance reads (None when off)."""
    cfg = resolve(raw, key=KEY)
    if cfg is None:
        return None
    refuse_unsupported(cfg, "sglang", UNSUPPORTED)
    if cfg.recovery.on_uncovered == "fail":
        raise ConfigError("recovery.on_uncovered", "fail",
                          "is not supported on sglang (with the full mirror no expert is "
                          "left uncovered while a rank survives); use wait or degrade")
    out = cfg.to_dict()
    out["instance"] = str((raw or {}).get("instance") or new_instance_id())
    return out


def export(settings: dict[str, Any] | None, env: dict[str, str] | None = None) -> None:
    """Hand ``settings`` (normalized; None: off) to the processes started from now on."""
    env = os.environ if env is None else env
    if settings is None:
        env.pop(ENV, None)
    else:
        env[ENV] = json.dumps(settings, sort_keys=True)


def clear_env(env: dict[str, str] | None = None) -> None:
    export(None, env)


def from_env(env: dict[str, str] | None = None) -> tuple[ResilienceConfig, str] | None:
    """(config, instance id) of the instance this process belongs to; None when off."""
    raw = (os.environ if env is None else env).get(ENV)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        raise ConfigError(ENV, raw[:80], "is not JSON (set by the resilient-ep front end)")
    instance = data.pop("instance", None)
    if not instance:
        raise ConfigError(f"{ENV}.instance", instance, "is missing")
    return ResilienceConfig.from_dict(data), str(instance)


@dataclass(frozen=True)
class SglangTopology:
    """The parallel layout of one SGLang instance, in the core's terms.

    SGLang's wide-EP layout is data-parallel attention inside one tensor-parallel group:
    ``tp_size`` scheduler processes, each an attention-DP rank of ``tp_size // dp_size``
    attention TP ranks, and the MoE layers split over ``ep_size`` expert-parallel ranks.
    With ``--dp-size N --enable-dp-attention --ep-size N --tp-size N`` (one attention rank per
    scheduler, the layout the failover path supports) scheduler ``i`` is DP rank ``i``, TP
    rank ``i`` and EP rank ``i``.
    """

    tp_size: int
    dp_size: int
    ep_size: int
    dp_attention: bool

    @property
    def failover_capable(self) -> bool:
        """One attention-DP rank and one EP rank per scheduler process, 2 or more of them."""
        return (self.dp_attention and self.tp_size >= 2 and self.dp_size == self.tp_size
                and self.ep_size == self.tp_size)

    def describe(self) -> str:
        return (f"tp_size={self.tp_size} dp_size={self.dp_size} ep_size={self.ep_size} "
                f"dp_attention={self.dp_attention}")


def topology_of(server_args: Any) -> SglangTopology:
    """Read the parallel layout from a (resolved) ``ServerArgs``."""
    from sglang.srt.arg_groups.overrides import resolving_view

    cfg = resolving_view(server_args)
    tp = int(getattr(cfg, "tp_size", 1) or 1)
    dp = int(getattr(cfg, "dp_size", 1) or 1)
    ep = int(getattr(cfg, "ep_size", 1) or 1)
    attn_dp = int(getattr(cfg, "attn_dp_size", 1) or 1)
    return SglangTopology(tp_size=tp, dp_size=max(dp, attn_dp), ep_size=ep,
                          dp_attention=attn_dp > 1)
