"""The failover groups of one vLLM instance: one :class:`~resilient_ep.transport.group.LiveGroup`
per process, among the data-parallel ranks.

- ``worker`` group (in each worker, one group per TP rank): the per-forward collectives that
  vLLM runs over gloo on the DP group (token counts, MoE all-gather / reduce-scatter). Strict:
  a lost member fails the forward pass on every survivor, which runs it again.
- ``core`` group (in each engine-core process): the "anyone still busy?" sum of the DP busy
  loop. Lenient: it completes over the live engines and never fails.

Endpoints are Unix sockets in the instance's directory (``instance.py``).

Each group reads this process's replica of the instance's membership
(``liveness.membership_replica``: kept equal to the authority's, the liveness monitor of the
process that started the engine cores, epochs included). What a
group finds out itself (a peer that dropped during a collective) it acts on at once and
reports to the authority, which fences the rank and publishes the loss; the group's epoch is
always one the authority decided.

Incarnations. Members never come back within a group's life, so a rank that rejoins
(``joining.py``) joins a new group: at the join every member switches, between two steps, to
the group of that join's epoch (``switch_worker_group`` / ``switch_core_group``: endpoints
``w<tp>e<epoch>`` / ``core-e<epoch>``) and retires the old one. A replacement rank runs on a
solo group of its own (no peer, no membership) until then: its warm-up forward passes never
touch the survivors.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from resilient_ep.liveness import LossReporter
from resilient_ep.transport.group import LiveGroup

from .instance import endpoints, instance_of
from .liveness import beacon_endpoint, membership_replica

__all__ = ["worker_group", "core_group", "current_worker_group", "current_core_group",
           "add_worker_listener", "switch_worker_group", "switch_core_group", "incarnation",
           "is_solo", "add_join_preparer"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler

_worker: LiveGroup | None = None
_core: LiveGroup | None = None
_worker_listeners: list[Callable] = []
_incarnation = {"worker": 0, "core": 0}
_solo = {"worker": False, "core": False}
_followed: set[str] = set()
REPLICA_WAIT_S = 30.0


def incarnation(kind: str = "worker") -> int:
    """The join epoch this process's ``kind`` group belongs to (0: the groups of the start)."""
    return _incarnation[kind]


def is_solo(kind: str = "worker") -> bool:
    """True while this process is a replacement rank not joined yet (its group has no peer)."""
    return _solo[kind]


def _kind_name(base: str, epoch: int) -> str:
    return base if epoch == 0 else f"{base}e{epoch}"


def _solo_group(name: str, rank: int, size: int, instance: str, kind: str, cfg) -> LiveGroup:
    """A replacement rank's group before its join: itself only, on endpoints of its own."""
    g = LiveGroup(f"{name}-solo", rank, endpoints(instance, f"{kind}solo{rank}", size),
                  detector=cfg.detector)
    g.configure(0, [rank])
    g.settle()
    return g


def worker_group(vllm_config: Any, dp_rank: int, dp_size: int, tp_rank: int) -> LiveGroup:
    """This worker's group (created on first use; a replacement rank's is solo)."""
    global _worker
    if _worker is None:
        from .replacement import is_replacement

        cfg, instance = instance_of(vllm_config)
        if is_replacement():
            _worker = _solo_group(f"workers-tp{tp_rank}", dp_rank, dp_size, instance,
                                  f"w{tp_rank}", cfg)
            _solo["worker"] = True
            log.info("resilient-ep: replacement worker on a solo group until it joins "
                     "(dp rank %d of %d)", dp_rank, dp_size)
        else:
            _worker = _new_worker_group(vllm_config, dp_rank, dp_size, tp_rank, 0)
            log.info("resilient-ep: worker failover group up (dp rank %d of %d)", dp_rank,
                     dp_size)
    if "worker" not in _preparing:
        _prepare_on_join("worker", vllm_config, lambda epoch: _build_worker_group(
            vllm_config, dp_rank, dp_size, tp_rank, epoch))
    return _worker


def _build_worker_group(vllm_config, dp_rank: int, dp_size: int, tp_rank: int,
                        epoch: int) -> LiveGroup:
    cfg, instance = instance_of(vllm_config)
    replica = membership_replica(instance, dp_size)
    return LiveGroup(_kind_name(f"workers-tp{tp_rank}", epoch), dp_rank,
                     endpoints(instance, _kind_name(f"w{tp_rank}", epoch), dp_size),
                     detector=cfg.detector, tied_to_parent=_worker_has_engine_parent(vllm_config),
                     membership=replica.membership, membership_replica=True)


def _new_worker_group(vllm_config, dp_rank: int, dp_size: int, tp_rank: int,
                      epoch: int) -> LiveGroup:
    cfg, instance = instance_of(vllm_config)
    replica = membership_replica(instance, dp_size)
    group = _take_prepared("worker", epoch) or _build_worker_group(
        vllm_config, dp_rank, dp_size, tp_rank, epoch)
    if epoch:  # made between two steps, at a join: its first pass starts at the join's view
        group.settle()  # (before the listeners: the ranks out already are nobody's news)
    # The instance's liveness monitor owns its membership: it hears of every loss a
    # worker group sees (a frozen worker whose engine core still beacons, a killed worker
    # whose engine core has not exited yet) and fences that rank.
    group.add_listener(LossReporter(beacon_endpoint(instance), dp_rank, known_dead=group.dead))
    for fn in _worker_listeners:
        group.add_listener(fn)
    _follow_authority("worker", replica)
    return group


def add_join_preparer(kind: str, fn: Callable) -> None:
    """Run ``fn(join)`` in this process's membership subscriber when it hears of a join it
    takes part in as a survivor (``kind``: ``worker`` or ``core``)."""
    _join_preparers[kind].append(fn)


def add_worker_listener(fn: Callable) -> None:
    """``fn(dead, epoch)`` on every change of this worker's group, whichever incarnation
    (none while solo: a replacement's warm-up knows no peer)."""
    _worker_listeners.append(fn)
    if _worker is not None and not _solo["worker"]:
        _worker.add_listener(fn)


def _worker_has_engine_parent(vllm_config: Any) -> bool:
    # The multiprocessing executor starts workers as children of the engine core; the "uni"
    # executor runs the worker inside it.
    return vllm_config.parallel_config.distributed_executor_backend != "uni"


def current_worker_group() -> LiveGroup | None:
    return _worker


def current_core_group() -> LiveGroup | None:
    return _core


def core_group(vllm_config: Any) -> LiveGroup:
    global _core
    if _core is None:
        from .replacement import is_replacement

        pc = vllm_config.parallel_config
        cfg, instance = instance_of(vllm_config)
        size, rank = int(pc.data_parallel_size), int(pc.data_parallel_rank)
        if is_replacement():
            _core = _solo_group("engine-cores", rank, size, instance, "core", cfg)
            _solo["core"] = True
        else:
            _core = _new_core_group(vllm_config, 0)
    return _core


def _build_core_group(vllm_config: Any, epoch: int) -> LiveGroup:
    pc = vllm_config.parallel_config
    cfg, instance = instance_of(vllm_config)
    size = int(pc.data_parallel_size)
    replica = membership_replica(instance, size)
    return LiveGroup(_kind_name("engine-cores", epoch), int(pc.data_parallel_rank),
                     endpoints(instance, _kind_name("core", epoch), size), detector=cfg.detector,
                     membership=replica.membership, membership_replica=True)


def prepare_core_groups(vllm_config: Any) -> None:
    """From now on, each join this engine core hears of has its group made (and connected)
    in the background, so the switch at the step boundary only swaps it in."""
    if "core" not in _preparing:
        _prepare_on_join("core", vllm_config, lambda epoch: _build_core_group(vllm_config, epoch))


def _new_core_group(vllm_config: Any, epoch: int) -> LiveGroup:
    pc = vllm_config.parallel_config
    _, instance = instance_of(vllm_config)
    replica = membership_replica(instance, int(pc.data_parallel_size))
    group = _take_prepared("core", epoch) or _build_core_group(vllm_config, epoch)
    if epoch:
        group.settle()
    _follow_authority("core", replica)
    return group


_prepared: dict[tuple[str, int], LiveGroup] = {}
switch_parts: dict[str, dict] = {}
"""The last switch of each kind, in parts (ms): waiting for the membership replica, taking
(or making) the join's group, retiring the old one; ``prepared``: its group was made ahead."""
_join_preparers: dict[str, list[Callable]] = {"worker": [], "core": []}
"""``fn(join)`` run when a survivor hears of a join, after its group is made: work the switch
would do otherwise (the expert maps' plan)."""
_preparing: set[str] = set()
_prepared_lock = threading.Lock()


def _prepare_on_join(kind: str, vllm_config: Any, build: Callable[[int], LiveGroup]) -> None:
    """Make the group of each join's incarnation as soon as this process hears of the join
    (the membership subscriber's thread): its sockets connect (and authenticate) while the
    current group still serves; ``switch_*`` then takes it."""
    from .replacement import takes_part

    _preparing.add(kind)
    _, instance = instance_of(vllm_config)
    replica = membership_replica(instance, int(vllm_config.parallel_config.data_parallel_size))
    me = int(vllm_config.parallel_config.data_parallel_rank)

    def on_join(join) -> None:
        if not takes_part(replica.events(), me, join.epoch):
            return  # history to a replacement: a join from before its own
        with _prepared_lock:
            if join.epoch <= _incarnation[kind] or (kind, join.epoch) in _prepared:
                return
            try:
                _prepared[(kind, join.epoch)] = build(join.epoch)
            except Exception:  # the switch makes it then
                log.exception("resilient-ep: preparing the %s group of epoch %d failed", kind,
                              join.epoch)
        if _solo[kind]:
            return  # a replacement replays the whole log at its flip
        for fn in _join_preparers[kind]:
            try:
                fn(join)
            except Exception:  # the switch computes it then
                log.exception("resilient-ep: preparing the join of epoch %d failed", join.epoch)

    replica.on_join(on_join)


def _take_prepared(kind: str, epoch: int) -> LiveGroup | None:
    with _prepared_lock:
        group = _prepared.pop((kind, epoch), None)
        for key in [k for k in _prepared if k[0] == kind and k[1] < epoch]:
            _retire(_prepared.pop(key))  # a join overtaken by a newer one
        return group


def _wait_replica(vllm_config: Any, epoch: int) -> None:
    """This process's replica of the membership must have seen the join of ``epoch`` before a
    group reads it (a lagging replica would take the joined rank out again)."""
    _, instance = instance_of(vllm_config)
    replica = membership_replica(instance, int(vllm_config.parallel_config.data_parallel_size))
    deadline = time.monotonic() + REPLICA_WAIT_S
    while replica.membership.epoch < epoch:
        if time.monotonic() > deadline:
            raise TimeoutError(f"membership replica at epoch {replica.membership.epoch}, "
                               f"the join is at {epoch}")
        time.sleep(0.002)


def _retire(group: LiveGroup | None, *, background: bool = False) -> None:
    """A group nobody runs a collective on any more: it reports nothing, then closes (its
    peers retire theirs at the same step, so none of them waits on it). ``background``: the
    closing (its heartbeat thread joined, its sockets closed: milliseconds) in a thread of
    its own, off the switch between two steps."""
    if group is None:
        return
    group._listeners.clear()
    if background:
        _retirer().put(group)
    else:
        group.shutdown()


_retiring: queue.SimpleQueue | None = None


def _retirer() -> queue.SimpleQueue:
    """The queue of a thread that shuts retired groups down (started on first use: a
    thread started per switch costs about a millisecond here)."""
    global _retiring
    if _retiring is None:
        _retiring = queue.SimpleQueue()

        def run(q=_retiring) -> None:
            while True:
                group = q.get()
                try:
                    group.shutdown()
                except Exception:  # noqa: BLE001 - a group that fails to close is no one's
                    log.exception("resilient-ep: retiring group %s failed", group.name)

        threading.Thread(target=run, name="resilient-ep-retire", daemon=True).start()
    return _retiring


def switch_worker_group(vllm_config: Any, epoch: int, dp_rank: int, dp_size: int,
                        tp_rank: int) -> LiveGroup:
    """Between two steps: this worker's collectives run on the group of join ``epoch`` from
    now on (the survivors and the joined rank switch at the same step)."""
    global _worker
    if epoch <= _incarnation["worker"]:
        return _worker
    t0 = time.monotonic()
    _wait_replica(vllm_config, epoch)
    t1 = time.monotonic()
    prepared = ("worker", epoch) in _prepared
    old, _worker = _worker, _new_worker_group(vllm_config, dp_rank, dp_size, tp_rank, epoch)
    t2 = time.monotonic()
    _incarnation["worker"], _solo["worker"] = epoch, False
    _retire(old, background=True)
    switch_parts["worker"] = {"replica_ms": (t1 - t0) * 1e3, "group_ms": (t2 - t1) * 1e3,
                              "retire_ms": (time.monotonic() - t2) * 1e3,
                              "prepared": prepared}
    log.info("resilient-ep: worker group of join epoch %d up (dp rank %d, live %s)", epoch,
             dp_rank, _worker.live)
    return _worker


def switch_core_group(vllm_config: Any, epoch: int) -> LiveGroup:
    """The engine core's half of :func:`switch_worker_group`."""
    global _core
    if epoch <= _incarnation["core"] and _core is not None:
        return _core
    t0 = time.monotonic()
    _wait_replica(vllm_config, epoch)
    t1 = time.monotonic()
    prepared = ("core", epoch) in _prepared
    old, _core = _core, _new_core_group(vllm_config, epoch)
    t2 = time.monotonic()
    _incarnation["core"], _solo["core"] = epoch, False
    _retire(old, background=True)
    switch_parts["core"] = {"replica_ms": (t1 - t0) * 1e3, "group_ms": (t2 - t1) * 1e3,
                            "retire_ms": (time.monotonic() - t2) * 1e3, "prepared": prepared}
    return _core


def _follow_authority(kind: str, replica) -> None:
    """Each loss the replica learns also wakes a collective of this process's current
    ``kind`` group blocked on the lost rank (``configure`` with the authority's view)."""
    if kind in _followed:
        return
    _followed.add(kind)

    def on_loss(loss) -> None:
        group = _worker if kind == "worker" else _core
        if group is not None and not _solo[kind]:
            group.configure(loss.epoch, replica.membership.view().live_ranks)

    replica.on_loss(on_loss)
