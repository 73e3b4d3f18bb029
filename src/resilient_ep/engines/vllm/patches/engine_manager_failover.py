"""Ledger entry ``vllm-engine-manager-failover`` (patches/vllm-engine-manager-failover.md).

Why: with several API server processes (vLLM's default for ``--data-parallel-size N``), the
``vllm serve`` launcher starts the engine cores itself (``CoreEngineProcManager``) and watches
them in ``monitor_engine_liveness``: the first engine core that exits makes it shut every
engine down, and the launcher then tears the API servers down too.

How (only when failover applies): ``__init__`` keeps the ``VllmConfig`` and what it started
the engine cores with, and ``wait_for_engine_startup`` the addresses it handed them (a
replacement engine core, ``rejoin.py``, is started and handshaken with the same);
``monitor_engine_liveness`` runs the instance's liveness monitor instead (``liveness.py``:
fence a lost rank whole, publish each loss to the API servers) and the instance's rejoins
(``rejoin_hosts.serve_rejoins``: a lost rank's replacement, asked for by any API server or by
``recovery.respawn``), and returns, as the original does, only once every engine core is gone
or the manager is stopped; on a headless node of a multi-node instance (``multinode.py``) it
follows the head's monitor instead (kills a local rank the head fenced; no rejoin across
nodes). Otherwise the originals run.
"""

from __future__ import annotations

import functools

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-engine-manager-failover"
TARGET_MODULE = "vllm.v1.engine.utils"
_INIT = ("self", "local_engine_count", "start_index", "local_start_index", "vllm_config",
         "local_client", "handshake_address", "executor_class", "log_stats",
         "client_handshake_address", "tensor_queue")


def _target():
    from vllm.v1.engine.utils import CoreEngineProcManager

    return CoreEngineProcManager


def check() -> None:
    check_version(NAME)
    cls = _target()
    expect_signature(NAME, cls.__init__, _INIT)
    expect_signature(NAME, cls.monitor_engine_liveness, ("self",))
    import vllm.v1.engine.utils as utils

    expect_signature(NAME, utils.wait_for_engine_startup,
                     ("handshake_socket", "core_engines", "parallel_config", "coordinated_dp",
                      "cache_config", "launch"))
    import inspect

    names = inspect.unwrap(cls.__init__).__code__.co_names
    for attr in ("processes", "manager_stopped", "shutdown"):
        if attr not in names and not hasattr(cls, attr):
            from . import PatchError

            raise PatchError(f"{NAME}: CoreEngineProcManager no longer has {attr}")


def is_applied() -> bool:
    return is_marked(_target().__dict__.get("monitor_engine_liveness"), NAME)


def apply() -> None:
    cls = _target()
    orig_monitor = cls.__dict__["monitor_engine_liveness"]
    if is_marked(orig_monitor, NAME):
        return
    orig_init = cls.__dict__["__init__"]

    @functools.wraps(orig_init)
    def __init__(self, local_engine_count, start_index, local_start_index, vllm_config,
                 *args, **kwargs):
        self._resilient_vllm_config = vllm_config
        self._resilient_start = dict(zip(_INIT[5:], args), **kwargs)
        orig_init(self, local_engine_count, start_index, local_start_index, vllm_config,
                  *args, **kwargs)

    import vllm.v1.engine.utils as utils

    orig_wait = utils.wait_for_engine_startup

    @functools.wraps(orig_wait)
    def wait_for_engine_startup(handshake_socket, core_engines, parallel_config, coordinated_dp,
                                cache_config, launch):
        manager = getattr(launch, "engine_manager", None)
        if manager is not None:
            manager._resilient_addresses = launch.addresses
            manager._resilient_coordinated_dp = coordinated_dp
        return orig_wait(handshake_socket, core_engines, parallel_config, coordinated_dp,
                         cache_config, launch)

    utils.wait_for_engine_startup = mark(wait_for_engine_startup, NAME, orig_wait)

    @functools.wraps(orig_monitor)
    def monitor_engine_liveness(self):
        from ..instance import failover_enabled
        from ..liveness import start_monitor

        cfg = getattr(self, "_resilient_vllm_config", None)
        if cfg is None or not failover_enabled(cfg):
            return orig_monitor(self)
        from .. import multinode
        from ..instance import instance_of
        from ..rejoin_hosts import serve_rejoins

        instance = instance_of(cfg)[1]
        nodes = multinode.registered(instance)
        if nodes is not None and not nodes.head:  # a headless node follows the head's monitor
            why = multinode.follow_head(instance, list(self.processes),
                                        int(cfg.parallel_config.data_parallel_size),
                                        self.manager_stopped)
            if why is not None:
                self.failed_proc_name = why
            self.shutdown()
            return
        monitor, ranks = start_monitor(cfg, list(self.processes))
        # rejoins start a replacement here: one host only (refused across nodes)
        service = serve_rejoins(self, monitor, ranks, instance) if nodes is None else None
        monitor.start()
        while monitor.alive and not self.manager_stopped.wait(0.5):
            pass
        if service is not None:
            service.stop()
        monitor.stop()
        if monitor.errored() is not None:
            self.failed_proc_name = f"resilient-ep liveness monitor ({monitor.errored()!r})"
        elif not self.manager_stopped.is_set():
            self.failed_proc_name = "every engine core"
        self.shutdown()

    cls.__init__ = mark(__init__, NAME, orig_init)
    cls.monitor_engine_liveness = mark(monitor_engine_liveness, NAME, orig_monitor)
