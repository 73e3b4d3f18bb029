"""Which SGLang instance this process belongs to, and its private endpoints.

The front end (``cli_args.before_launch``) gives every resilience-enabled launch an instance
id and hands the validated settings to every process it starts (``config.ENV``). Every
process of the instance finds them with :func:`current`; its sockets live in the instance's
private directory (:mod:`resilient_ep.engines.common.instance`: mode 0700, a per-instance
key for CURVE / message tags):

- ``tp-<rank>``: each scheduler's inbox of the failover group (``groups.py``);
- ``beacons-0``: the membership authority's liveness socket (beacons and loss reports);
- ``membership``: the authority's membership feed (``MembershipSubscriber``).
"""

from __future__ import annotations

import os
from functools import lru_cache

from resilient_ep.config import ResilienceConfig

from ..common.instance import endpoints, join_instance
from . import config

__all__ = ["current", "failover_enabled", "failover_on", "beacon_endpoint", "membership_endpoint",
           "group_endpoints", "FAILOVER_ENV", "INCARNATION_SEP", "base_rid"]

INCARNATION_SEP = "@"
"""``<rid>@<n>``: the front end's n-th incarnation of request ``rid`` (moved off a lost rank)."""


def base_rid(rid: str) -> str:
    """The id the client knows, for any incarnation of a request."""
    return rid.split(INCARNATION_SEP, 1)[0]

FAILOVER_ENV = "RESILIENT_EP_SGLANG_FAILOVER"
"""``0`` turns the failover datapath off while resilience (and the CPU patches) stay on: the
benchmark's "off" arm."""


@lru_cache(maxsize=1)
def _cached(raw: str) -> tuple[ResilienceConfig, str] | None:
    return config.from_env({config.ENV: raw})


def current() -> tuple[ResilienceConfig, str] | None:
    """(config, instance id) of this process's instance; None when resilience is off."""
    raw = os.environ.get(config.ENV)
    return _cached(raw) if raw else None


def failover_enabled() -> bool:
    """Resilience on, the failover path not switched off, and (in a scheduler process) the
    topology it supports: one attention-DP rank and one EP rank per scheduler, 2 or more."""
    if current() is None or os.environ.get(FAILOVER_ENV, "1") == "0":
        return False
    from sglang.srt.runtime_context import get_parallel

    p = get_parallel()
    return (p.tp_size >= 2 and p.attn_dp_size == p.tp_size and p.moe_ep_size == p.tp_size
            and p.pp_size == 1)


_failover: list[bool] = []


def failover_on() -> bool:
    """:func:`failover_enabled`, decided once per process (the hooks ask on every call)."""
    if not _failover:
        _failover.append(failover_enabled())
    return _failover[0]


def beacon_endpoint(instance: str) -> str:
    return endpoints(instance, "beacons", 1)[0]


def membership_endpoint(instance: str) -> str:
    return f"ipc://{join_instance(instance)}/membership"


def group_endpoints(instance: str, size: int) -> list[str]:
    return endpoints(instance, "tp", size)
