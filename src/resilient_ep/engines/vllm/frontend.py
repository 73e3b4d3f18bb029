"""The API server's engine client, with failover: :class:`ResilientDPLBAsyncMPClient`.

vLLM's ``DPLBAsyncMPClient`` balances requests over the data-parallel engine cores and, when
any of them dies, marks the whole engine dead and shuts every core down
(``MPClient.start_engine_core_monitor``). This subclass instead:

- follows the instance's membership authority (``liveness.py``: the core's
  :class:`~resilient_ep.liveness.LivenessMonitor` in this process with one API server, or
  the launcher's, subscribed to, with several); the monitor fences a lost rank whole
  (engine core and workers) whether it exited, froze (no beacon for
  ``detector.heartbeat_timeout_ms``) or was reported lost by its peers' collective groups;
- sends no new request to a dead rank (``get_core_engine_for_request``);
- re-admits the requests this API server had on the dead rank, each on the rank the core's
  policy picks (:func:`resilient_ep.recovery.assign_requests`: least work, ties to the
  lowest rank), under the same request id, with prompt = original prompt + tokens generated
  so far and the remaining ``max_tokens``, and (KV checkpoints on) a ``resilient_restore``
  that lets the survivor load the request's newest checkpoint: the client's stream simply
  continues (greedy output is the same as without the failure; seeded sampling continues
  with a fresh generator);
- drops anything still arriving from the dead rank, so no token is delivered twice.

Engines other than the dead one keep running: their workers re-run the step they were in
without the dead rank (``step_rerun.py``).
Installed by the ``vllm-dp-client-failover`` patch (``EngineCoreClient.make_async_mp_client``)
when failover applies, for every API server process.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from vllm.v1.engine.core_client import DPLBAsyncMPClient

from resilient_ep.liveness import MembershipSubscriber
from resilient_ep.membership import Membership
from resilient_ep.recovery import assign_requests

__all__ = ["ResilientDPLBAsyncMPClient", "readmission_request"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


def _log_failed_readmission(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("resilient-ep: re-admitting a request failed: %r", task.exception())


def readmission_request(request, generated: list[int], restore: bool = False,
                        from_rank: int | None = None):
    """A copy of ``request`` that continues after ``generated`` tokens; with ``restore`` it
    asks the KV connector (``kv_connector.py``) to load the request's newest verified
    checkpoint, so only the tail after it is recomputed (``from_rank``: the lost rank it ran
    on, whose store the connector does not ask)."""
    import copy

    new = copy.copy(request)
    new.prompt_token_ids = list(request.prompt_token_ids) + list(generated)
    sp = request.sampling_params.clone()
    if restore:  # vLLM carries a request's kv_transfer_params in its sampling extra_args
        extra = dict(sp.extra_args or {})
        params = dict(extra.get("kv_transfer_params") or {})
        params.setdefault("resilient_restore", params.get("resilient_id") or request.request_id)
        if from_rank is not None:
            params["resilient_from"] = int(from_rank)
        extra["kv_transfer_params"] = params
        sp.extra_args = extra
    if sp.max_tokens is not None:
        sp.max_tokens = max(1, sp.max_tokens - len(generated))
    if getattr(sp, "min_tokens", 0):
        sp.min_tokens = max(0, sp.min_tokens - len(generated))
    new.sampling_params = sp
    new.data_parallel_rank = None
    return new


class ResilientDPLBAsyncMPClient(DPLBAsyncMPClient):
    def __init__(self, vllm_config, *args, **kwargs):
        self.resilient_membership = Membership(int(vllm_config.parallel_config.data_parallel_size))
        self.resilient_events: list[dict] = []
        self.resilient_liveness = None  # LivenessMonitor (one API server) or MembershipSubscriber
        self._re_requests: dict[str, object] = {}
        self._re_generated: dict[str, list[int]] = {}
        self._re_deaths: dict[str, int] = {}  # rank deaths each request was in flight at
        self.resilient_poisoned: list[dict] = []
        self.resilient_joins: list[dict] = []
        self.resilient_rejoiner = None  # rejoin.Rejoiner here, or the launcher's (RemoteRejoiner)
        self._re_rank_procs = None
        self._re_relay = None  # rejoin_relay.EngineCallRelay, with several API servers
        # (this API server's index: vLLM sets ``client_index`` only after the monitor starts)
        self._re_index = int(kwargs.get("client_index", args[4] if len(args) > 4 else 0))
        self._re_loop_watch = None
        try:  # vLLM makes the client inside the API server's event loop
            self._re_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._watch_loop()
        except RuntimeError:
            self._re_loop = None
        super().__init__(vllm_config, *args, **kwargs)
        import zmq

        # A replacement engine core (rejoin.py) connects with the lost rank's identity: the
        # input ROUTER hands the identity over to it (vLLM does the same for elastic EP).
        self.input_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        from .kv_setup import is_ours

        self._re_restore = is_ours(getattr(self.vllm_config, "kv_transfer_config", None))
        from .instance import instance_of

        settings = instance_of(self.vllm_config)
        self._re_max_failures = settings[0].recovery.max_request_failures if settings else 0

    def _watch_loop(self) -> None:
        """Log this API server's event loop when it stops running (``loop_watch.py``)."""
        from resilient_ep.engines.common.loop_watch import LoopWatch

        self._re_loop_watch = LoopWatch(self._re_loop, name=f"API server {self._re_index}",
                                        logger=log).start()

    @property
    def resilient_epoch(self) -> int:
        """The instance's membership epoch (one bump per rank lost)."""
        return self.resilient_membership.epoch

    @property
    def resilient_dead(self) -> set[int]:
        view = self.resilient_membership.view()
        return {r for r in range(view.num_ranks) if not view.is_live(r)}

    # ---------------------------------------------------------------- liveness
    def start_engine_core_monitor(self):
        """Instead of vLLM's shut-everything-down monitor: the core's liveness monitor over
        the engine cores this process started, or (several API servers: the launcher started
        them) a subscription to the launcher's monitor. Either feeds this client's
        membership and calls :meth:`_engine_died` once per lost rank."""
        from .instance import instance_of
        from .liveness import membership_endpoint, start_monitor

        self_ref = weakref.ref(self)

        def on_loss(loss) -> None:
            me = self_ref()
            if me is None or not me._finalizer.alive or me.resources.engine_dead:
                return
            me._engine_died(loss)

        manager = self.resources.engine_manager
        if manager is not None:
            from .rejoin import Rejoiner
            from .rejoin_hosts import ClientHost

            monitor, self._re_rank_procs = start_monitor(self.vllm_config,
                                                         list(manager.processes),
                                                         membership=self.resilient_membership)
            monitor.add_listener(on_loss)
            self.resilient_rejoiner = Rejoiner(ClientHost(self, monitor, self._re_rank_procs))
            self.resilient_liveness = monitor.start()
            return
        settings = instance_of(self.vllm_config)
        if settings is None:
            return
        from .rejoin_relay import EngineCallRelay, RemoteRejoiner

        def on_join(join) -> None:  # the launcher's rejoin: this API server routes to it again
            me = self_ref()
            if me is not None:
                me.resilient_rejoined(join.rank, join.epoch)

        # The launcher runs the rejoins (``rejoin_relay.py``): it takes this API server's
        # requests and calls the engines through this API server's relay.
        self.resilient_rejoiner = RemoteRejoiner(settings[1])
        self._re_relay = EngineCallRelay(self, settings[1], self._re_index).start()
        self.resilient_liveness = MembershipSubscriber(
            membership_endpoint(settings[1]), self.resilient_membership, on_loss,
            on_join=on_join).start()

    def _engine_died(self, loss) -> None:
        t = time.monotonic()
        loop = self._re_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_engine_death, loss, t)
        else:
            self._on_engine_death(loss, t)

    def _on_engine_death(self, loss, handled_from: float) -> None:
        rank = loss.rank
        live = [i for i in range(len(self.core_engines)) if i not in self.resilient_dead]
        log.warning("resilient-ep: engine core DP%d lost (%s, exit code %s); live DP ranks %s, "
                    "epoch %d", rank, loss.cause, loss.exitcode, live, loss.epoch)
        if not live:
            self.resources.engine_dead = True
            self.shutdown()
            return
        dead_engine = self.core_engines[rank]
        victims = [rid for rid, eng in self.reqs_in_flight.items() if eng == dead_engine]
        for rid in victims:
            self.reqs_in_flight.pop(rid, None)
            self.engine_inflight[dead_engine] -= 1
        # The core's policy picks each request's new rank (as in the reference runtime).
        plan = assign_requests(
            {rid: rank for rid in victims if rid in self._re_requests}, [rank], live,
            load={i: self.engine_inflight[self.core_engines[i]] for i in live},
            deaths=self._re_deaths, max_request_failures=self._re_max_failures)
        if plan.exhausted:
            self._fail_poisoned(plan.exhausted, rank)
        readmitted = readmitted_tokens = 0
        for rid, target in plan.migrations.items():
            self._re_deaths[rid] = self._re_deaths.get(rid, 0) + 1
            try:
                new = readmission_request(self._re_requests[rid], self._re_generated.get(rid, []),
                                          restore=self._re_restore, from_rank=rank)
                new.data_parallel_rank = target
            except Exception:  # one request that cannot be copied must not cost the others
                log.exception("resilient-ep: request %s could not be re-admitted", rid)
                continue
            task = asyncio.ensure_future(self.add_request_async(new))
            task.add_done_callback(_log_failed_readmission)
            readmitted += 1
            readmitted_tokens += len(new.prompt_token_ids)
        self.resilient_events.append({
            "dp_rank": rank, "exitcode": loss.exitcode, "cause": loss.cause,
            "injected_monotonic": self._injected_at(rank),
            "detected_monotonic": loss.detected_monotonic,
            "first_output_monotonic": None,
            "handled_monotonic": time.monotonic(), "readmitted": readmitted,
            "readmitted_tokens": readmitted_tokens, "epoch": loss.epoch})
        log.warning("resilient-ep: re-admitted %d request(s) of DP%d on %s", readmitted, rank,
                    live)
        self._maybe_respawn(rank)

    def _maybe_respawn(self, rank: int) -> None:
        """``recovery.respawn``: a replacement for the lost rank, at once (with several API
        servers the launcher starts it, on the same loss)."""
        from .rejoin import Rejoiner, respawn

        if isinstance(self.resilient_rejoiner, Rejoiner):
            respawn(self.resilient_rejoiner, self.vllm_config, rank)

    def resilient_rejoined(self, rank: int, epoch: int) -> None:
        """A replacement for ``rank`` joined at ``epoch`` (``rejoin.py``): new requests go to
        it from now on (it is live in the membership this client routes by)."""
        self.resilient_joins.append({"dp_rank": rank, "epoch": epoch,
                                     "joined_monotonic": time.monotonic()})
        log.warning("resilient-ep: engine core DP%d rejoined at epoch %d", rank, epoch)

    def _injected_at(self, rank: int) -> float | None:
        """When a fault armed by ``faults.py`` fired on ``rank`` (None: nobody injected it)."""
        from .faults import fired_at
        from .instance import instance_of

        settings = instance_of(self.vllm_config)
        return fired_at(settings[1], rank) if settings else None

    def _fail_poisoned(self, rids: list[str], rank: int) -> None:
        """End these requests with an error (``recovery.max_request_failures``): each was in
        flight at that many rank deaths and may be what kills them. Their streams get vLLM's
        error finish (an HTTP 500 with the reason), as from an engine."""
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

        outs = []
        for rid in rids:
            deaths = self._re_deaths.pop(rid, 0) + 1
            self._re_requests.pop(rid, None)
            self._re_generated.pop(rid, None)
            self.resilient_poisoned.append({"request_id": rid, "deaths": deaths,
                                            "last_dp_rank": rank})
            outs.append(EngineCoreOutput(
                request_id=rid, new_token_ids=[], finish_reason=FinishReason.ERROR,
                stop_reason=f"resilient-ep: request was in flight at {deaths} engine rank "
                            f"deaths (recovery.max_request_failures={self._re_max_failures}); "
                            "not moved again"))
        log.error("resilient-ep: %d request(s) failed after %d rank deaths each, not moved "
                  "again: %s", len(rids), self._re_max_failures, rids)
        self.outputs_queue.put_nowait(EngineCoreOutputs(outputs=outs))

    # ---------------------------------------------------------------- routing
    def get_core_engine_for_request(self, request):
        if request.data_parallel_rank is not None and \
                request.data_parallel_rank in self.resilient_dead:
            request.data_parallel_rank = None
        chosen = super().get_core_engine_for_request(request)
        if not self.resilient_dead or self.core_engines.index(chosen) not in self.resilient_dead:
            return chosen
        self.engine_inflight[chosen] -= 1
        live = [e for i, e in enumerate(self.core_engines) if i not in self.resilient_dead]
        target = min(live, key=lambda e: self.engine_inflight[e])
        self.reqs_in_flight[request.request_id] = target
        self.engine_inflight[target] += 1
        return target

    async def add_request_async(self, request) -> None:
        if self._re_loop is None:
            self._re_loop = asyncio.get_running_loop()
            self._watch_loop()
        if request.prompt_token_ids is not None and request.sampling_params is not None:
            self._re_requests[request.request_id] = request
            self._re_generated[request.request_id] = []
        await super().add_request_async(request)

    async def abort_requests_async(self, request_ids) -> None:
        for rid in request_ids:
            self._re_requests.pop(rid, None)
            self._re_generated.pop(rid, None)
            self._re_deaths.pop(rid, None)
        await super().abort_requests_async(request_ids)

    @staticmethod
    async def process_engine_outputs(self, outputs):
        if self.resilient_dead and outputs.engine_index in self.resilient_dead:
            # Sent by a rank before it died and read after we re-admitted its requests.
            outputs.outputs = []
            outputs.finished_requests = None
            outputs.scheduler_stats = None
            return
        if outputs.outputs and self.resilient_events and \
                self.resilient_events[-1]["first_output_monotonic"] is None:
            now = time.monotonic()  # the stall of each loss ends at a survivor's next output
            for e in self.resilient_events:
                if e["first_output_monotonic"] is None:
                    e["first_output_monotonic"] = now
        for out in outputs.outputs:
            gen = self._re_generated.get(out.request_id)
            if gen is not None:
                gen.extend(out.new_token_ids)
                if out.finish_reason is not None:
                    self._re_generated.pop(out.request_id, None)
                    self._re_requests.pop(out.request_id, None)
                    self._re_deaths.pop(out.request_id, None)
        await DPLBAsyncMPClient.process_engine_outputs(self, outputs)
