"""Ledger entry ``vllm-dp-client-failover`` (patches/vllm-dp-client-failover.md).

Why: ``MPClient.start_engine_core_monitor`` shuts every engine core down when one dies, and
``DPLBAsyncMPClient`` keeps routing to a dead rank. The client class is picked inside
``EngineCoreClient.make_async_mp_client`` (called from ``AsyncLLM.__init__``); no hook selects
another class.

How: when resilience is on with DP > 1 and EP and internal load balancing, the factory
returns :class:`~resilient_ep.engines.vllm.frontend.ResilientDPLBAsyncMPClient` (a subclass:
follows the instance's membership, routes around a dead rank, re-admits its requests), in
every API server process (vLLM's default for DP is one per DP rank; each follows the
launcher's liveness monitor, see ``liveness.py`` and ``vllm-engine-manager-failover``).
"""

from __future__ import annotations

import functools
import logging

from . import check_version, expect_overrides, expect_signature, is_marked, mark

NAME = "vllm-dp-client-failover"
TARGET_MODULE = "vllm.v1.engine.core_client"
_PARAMS = ("vllm_config", "executor_class", "log_stats", "client_addresses", "client_count",
           "client_index", "renderer")

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


def _target():
    from vllm.v1.engine.core_client import EngineCoreClient

    return EngineCoreClient


# What ResilientDPLBAsyncMPClient (frontend.py) overrides or relies on in DPLBAsyncMPClient.
OVERRIDES = {
    "__init__": ("self", "vllm_config", "executor_class", "log_stats", "client_addresses",
                 "client_count", "client_index", "renderer"),
    "start_engine_core_monitor": ("self",),
    "get_core_engine_for_request": ("self", "request"),
    "add_request_async": ("self", "request"),
    "abort_requests_async": ("self", "request_ids"),
    "process_engine_outputs": ("self", "outputs"),
    "_call_utility_async": ("self", "method", "args", "engine"),
}


def check() -> None:
    check_version(NAME)
    expect_signature(NAME, _target().make_async_mp_client, _PARAMS)
    from vllm.v1.engine.core_client import DPLBAsyncMPClient

    expect_overrides(NAME, DPLBAsyncMPClient, OVERRIDES)


def is_applied() -> bool:
    return is_marked(_target().__dict__["make_async_mp_client"].__func__, NAME)


def apply() -> None:
    cls = _target()
    original = cls.__dict__["make_async_mp_client"].__func__
    if is_marked(original, NAME):
        return

    @functools.wraps(original)
    def make_async_mp_client(vllm_config, executor_class, log_stats, client_addresses=None,
                             client_count=1, client_index=0, renderer=None):
        from ..instance import failover_enabled

        pc = vllm_config.parallel_config
        if failover_enabled(vllm_config) and not pc.data_parallel_external_lb:
            from ..frontend import ResilientDPLBAsyncMPClient

            # One API server or several: each follows the instance's membership
            # (liveness.py) and re-admits its own requests.
            return ResilientDPLBAsyncMPClient(
                vllm_config, executor_class, log_stats, client_addresses, client_count,
                client_index, renderer=renderer)
        return original(vllm_config, executor_class, log_stats, client_addresses,
                        client_count, client_index, renderer)

    cls.make_async_mp_client = staticmethod(mark(make_async_mp_client, NAME, original))
