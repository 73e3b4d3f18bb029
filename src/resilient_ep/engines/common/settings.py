"""The ``resilience`` settings dict every engine adapter carries, resolved one way.

An adapter receives a dict of :class:`~resilient_ep.config.ResilienceConfig` fields plus a few
adapter keys: ``config_file`` (a YAML file with the same shape, optionally under a top-level
``resilience:`` key), ``overrides`` (``["key.sub=value", ...]``) and bookkeeping the front end
writes (``instance``, ``shadow_slots``). Precedence: YAML file < dict keys < overrides.
``{"enabled": false}`` is off.
"""

from __future__ import annotations

import uuid
from typing import Any

from resilient_ep.config import ConfigError, ResilienceConfig

__all__ = ["ADAPTER_KEYS", "resolve", "merge", "new_instance_id"]

ADAPTER_KEYS = ("config_file", "overrides", "instance", "shadow_slots")


def resolve(raw: dict[str, Any] | None, *, key: str = "resilience") -> ResilienceConfig | None:
    """The validated config of a settings dict; None when absent or turned off. A bad value
    raises :class:`~resilient_ep.config.ConfigError` naming the dotted field."""
    if raw is None:
        return None
    data = {k: v for k, v in raw.items() if k not in ADAPTER_KEYS}
    path = raw.get("config_file")
    if path:
        base = ResilienceConfig.from_yaml(path).to_dict()
        cfg = ResilienceConfig.from_dict(merge(base, data))
    else:
        cfg = ResilienceConfig.from_dict(data)
    overrides = raw.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"{key}.overrides", overrides, "must be a list of key.sub=value")
    if overrides:
        cfg = cfg.with_overrides(list(overrides))
    return cfg if cfg.enabled else None


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` laid over it, section by section."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def new_instance_id() -> str:
    """A fresh instance id (names the instance's private directory and sockets)."""
    return uuid.uuid4().hex[:12]
