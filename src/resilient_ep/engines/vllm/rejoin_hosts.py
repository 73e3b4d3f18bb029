"""Where a :class:`~.rejoin.Rejoiner` runs: the process that started the engine cores and runs
the instance's membership authority (:class:`~.rejoin.RejoinHost`).

- :class:`ClientHost`: one API server (``--api-server-count 1``). The API server started
  the engine cores; its engine client calls them.
- :class:`LauncherHost`: several API servers (vLLM's default for ``--data-parallel-size N``).
  The ``vllm serve`` launcher started the engine cores and runs the authority, but holds no
  engine client (vLLM connects every engine core to the API servers only): it calls the
  engines through an API server's relay (``rejoin_relay.py``), the first that answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

__all__ = ["ClientHost", "LauncherHost", "EngineLost", "serve_rejoins"]


class EngineLost(RuntimeError):
    """The engine a call went to was lost before it answered."""


class ClientHost:
    """The API server's engine client (``frontend.ResilientDPLBAsyncMPClient``) as the
    rejoiner's host."""

    def __init__(self, client: Any, monitor: Any, rank_procs: Any):
        self.client = client
        self.monitor = monitor
        self.rank_procs = rank_procs

    @property
    def vllm_config(self):
        return self.client.vllm_config

    @property
    def manager(self):
        return self.client.resources.engine_manager

    @property
    def num_ranks(self) -> int:
        return len(self.client.core_engines)

    def dead(self) -> set[int]:
        return set(self.client.resilient_dead)

    def call(self, engine: int, utility: str, args: tuple, timeout_s: float, *,
             watch_loss: bool = True) -> Any:
        c = self.client
        loop = c._re_loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the API server's event loop is not known yet")
        fut = asyncio.run_coroutine_threadsafe(
            c._call_utility_async(utility, *args, engine=c.core_engines[engine]), loop)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return fut.result(0.1)
            except concurrent.futures.TimeoutError:
                if watch_loss and engine in c.resilient_dead:
                    fut.cancel()
                    raise EngineLost(f"DP{engine} was lost while it answered {utility} "
                                     f"{args[:1]}")
                if time.monotonic() > deadline:
                    fut.cancel()
                    raise TimeoutError(f"DP{engine} did not answer {utility} {args[:1]} in "
                                       f"{timeout_s} s")

    def rejoined(self, rank: int, epoch: int) -> None:
        self.client.resilient_rejoined(rank, epoch)


class LauncherHost:
    """The ``vllm serve`` launcher (several API servers) as the rejoiner's host: vLLM's engine
    manager and the liveness monitor are here; engine calls go through an API server."""

    def __init__(self, manager: Any, monitor: Any, rank_procs: Any, instance: str):
        self.manager = manager
        self.monitor = monitor
        self.rank_procs = rank_procs
        self.instance = instance
        self.joins: list[dict[str, Any]] = []

    @property
    def vllm_config(self):
        return self.manager._resilient_vllm_config

    @property
    def num_ranks(self) -> int:
        return int(self.vllm_config.parallel_config.data_parallel_size)

    def dead(self) -> set[int]:
        view = self.monitor.membership.view()
        return {r for r in range(view.num_ranks) if not view.is_live(r)}

    def call(self, engine: int, utility: str, args: tuple, timeout_s: float, *,
             watch_loss: bool = True) -> Any:
        from .rejoin_relay import call_engine

        def lost() -> bool:
            return watch_loss and engine in self.dead()

        return call_engine(self.instance, engine, utility, args, timeout_s, lost=lost)

    def rejoined(self, rank: int, epoch: int) -> None:
        self.joins.append({"dp_rank": rank, "epoch": epoch, "joined_monotonic": time.monotonic()})


def serve_rejoins(manager: Any, monitor: Any, rank_procs: Any, instance: str):
    """The launcher's rejoins (several API servers): a :class:`~.rejoin.Rejoiner` on a
    :class:`LauncherHost`, its desk for the API servers, and ``recovery.respawn`` on every
    loss. Returns the :class:`~.rejoin_relay.RejoinService` (stop it at shutdown)."""
    from .rejoin import Rejoiner, respawn
    from .rejoin_relay import RejoinService

    host = LauncherHost(manager, monitor, rank_procs, instance)
    rejoiner = Rejoiner(host)
    monitor.add_listener(lambda loss: respawn(rejoiner, host.vllm_config, loss.rank))
    return RejoinService(rejoiner, host, instance).start()
