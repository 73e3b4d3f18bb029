"""KV checkpoints in vLLM: a ``KVConnectorBase_V1`` connector over :mod:`resilient_ep.kv`.

Out of tree, through vLLM's own hook::

    --kv-transfer-config '{"kv_connector": "ResilientKVConnector",
        "kv_connector_module_path": "resilient_ep.engines.vllm.kv_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"store": "shm", "base_dir": "/dev/shm/rep-kv",
                                      "interval_tokens": 32, "replicas": 1}}'

- **Save.** The scheduler side decides, per step, which running requests have
  ``interval_tokens`` more computed tokens than their last save and sends them in the step's
  metadata; after the forward (``wait_for_save``) the worker side hands them to a
  :class:`~resilient_ep.kv.KVCheckpointer`, whose background thread copies the changed blocks of
  every layer (opaque bytes, vLLM's layout) to the stores. Finished requests are forgotten (and
  their copies deleted) before the next forward can reuse their blocks.
- **Restore as an external cache hit.** A request re-admitted after its engine died carries
  ``kv_transfer_params={"resilient_restore": KEY}`` (``KEY``: the original request's
  ``resilient_id``, or its vLLM request id) and its prompt plus the tokens already streamed.
  ``get_num_new_matched_tokens`` finds the checkpoint, checks it was made from the same tokens
  and reports its length as external tokens (the last block may be partial); vLLM allocates the blocks and the
  worker writes the checkpoint into them before the forward (``start_load_kv``); vLLM computes
  only the rest. Blocks that fail their checksum are reported through
  ``get_block_ids_with_load_errors`` and vLLM recomputes them.

Stores:
- ``peer`` (the default of ``--enable-resilience``): another engine rank's memory. Each engine
  core serves a :class:`~resilient_ep.kv.peer_store.PeerStoreServer` for its peers (started
  by the scheduler side of this connector, ``ipc://<instance dir>/kvstore-<dp rank>``); each
  worker saves its requests' replicas to the next ``replicas`` live ranks of the ring, so a
  checkpoint outlives the rank (and, across nodes, the node) it was made on. Which ranks are
  live comes from this process's replica of the instance's membership (``liveness.py``); the
  scheduler side also sends its view with each step's metadata, so a worker never waits on
  the store of a rank its engine already knows is gone. A re-admitted request names the rank
  it came from (``resilient_from``): that rank's store is never asked.
- ``shm`` and ``file``: directories shared by the scheduler and worker processes of a host.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from ...config import KVCheckpointConfig
from ...kv.cache_views import LayerListView
from ...kv.checkpoint import KVCheckpointer
from ...kv.locations import StoreSet, StoreSpec
from ...kv.meta import token_crc

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

__all__ = ["ResilientKVConnector", "ResilientKVConnectorMetadata"]

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


class ResilientKVConnectorMetadata(KVConnectorMetadata):
    def __init__(self) -> None:
        self.saves: list[tuple[str, list[int], int, list[int]]] = []   # key, tokens, n, block ids
        self.loads: list[tuple[str, list[int], int, list[int], str | None]] = []
        """key, tokens, n, block ids, where the scheduler found the checkpoint."""
        self.forgets: list[str] = []
        self.view: tuple[int, tuple[int, ...]] | None = None  # peer: (epoch, live ranks)
        self.started = False  # worker side: loads done (a re-run step does not load twice)


def _key(request: "Request") -> str:
    params = request.kv_transfer_params or {}
    return str(params.get("resilient_id") or params.get("resilient_restore") or request.request_id)


_servers: dict[str, object] = {}


def _serve_peer_store(endpoint: str, dp_rank: int) -> None:
    """This engine rank's peer store (one per process): its peers' checkpoint copies."""
    if endpoint in _servers:
        return
    from ...kv.peer_store import PeerStoreServer

    _servers[endpoint] = PeerStoreServer(endpoint, location=f"peer:{dp_rank}").start()
    log.info("resilient-ep: KV checkpoint peer store of DP%d at %s", dp_rank, endpoint)


class ResilientKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.block_size = vllm_config.cache_config.block_size
        kind = extra.get("store", "shm")
        if kind not in ("peer", "shm", "file"):
            raise ValueError("kv_connector_extra_config.store must be peer, shm or file, "
                             f"got {kind!r}")
        self.cfg = KVCheckpointConfig(interval_tokens=int(extra.get("interval_tokens", 32)), store=kind,
                                      replicas=int(extra.get("replicas", 1)),
                                      timeout_ms=float(extra.get("timeout_ms", 2000.0)))
        pc = vllm_config.parallel_config
        self.dp_rank, self.dp_size = int(pc.data_parallel_rank), int(pc.data_parallel_size)
        self.replica = None
        if kind == "peer":
            instance = extra.get("instance")
            if not instance:
                raise ValueError("kv_connector_extra_config.instance is required with store "
                                 "peer (the resilient-ep instance whose ranks hold the copies)")
            from ...kv.peer_store import peer_endpoint
            from . import multinode
            from .instance import instance_of, join_instance
            from .liveness import membership_replica

            instance_of(vllm_config)  # across nodes: registers where the stores listen
            run_dir = str(join_instance(str(instance)))
            nodes = multinode.registered(str(instance))
            if nodes is not None:  # TCP at each rank's node; copies to other nodes first
                self.spec = StoreSpec("peer", self.cfg.replicas, peer_endpoints=tuple(
                    nodes.endpoints("kvstore", self.dp_size)), peer_nodes=tuple(
                    nodes.addressing.node_of(r) for r in range(self.dp_size)))
            else:
                self.spec = StoreSpec("peer", self.cfg.replicas, peer_endpoints=tuple(
                    peer_endpoint(run_dir, r) for r in range(self.dp_size)))
            self.replica = membership_replica(str(instance), self.dp_size)
            if role == KVConnectorRole.SCHEDULER:
                _serve_peer_store(self.spec.peer_endpoints[self.dp_rank], self.dp_rank)
        else:
            self.spec = StoreSpec(kind, self.cfg.replicas,
                                  base_dir=str(extra.get("base_dir", "/dev/shm/rep-kv")))
        self._gone: set[int] = set()  # ranks re-admitted requests came from (dead)
        self.keep_on_finish = bool(extra.get("keep_on_finish", False))
        """Keep a finished request's checkpoint (tests; reuse by a follow-up request)."""
        # scheduler side
        self._reqs: dict[str, dict] = {}
        self._pending_loads: dict[str, tuple[str, int]] = {}
        self._loads: list[tuple[str, list[int], int, list[int]]] = []
        self._forgets: list[str] = []
        self._stores: StoreSet | None = None
        # worker side
        self.ckpt: KVCheckpointer | None = None
        self.view: LayerListView | None = None
        self._load_errors: set[int] = set()
        self.stats = {"store": kind, "external_hit_tokens": 0, "loads": 0, "load_errors": 0}

    # ================================================================== scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        self._reqs.setdefault(request.request_id, {"request": request, "key": _key(request),
                                                   "blocks": [], "saved": 0})
        params = request.kv_transfer_params or {}
        key = params.get("resilient_restore")
        if not key:
            return 0, False
        if params.get("resilient_from") is not None:
            self._gone.add(int(params["resilient_from"]))
        view = self._view()
        if self._stores is None:
            self._stores = StoreSet(self.spec)
        if self._stores.epoch != view[0] or self._stores.members != frozenset(view[1]):
            self._stores.configure(*view)
        tokens = list(request.all_token_ids)
        best, where = 0, None
        seen = []
        for loc in self.spec.candidates(view[1]):
            try:
                m = self._stores.get(loc).head(str(key), time.monotonic() + 2)
            except (RuntimeError, TimeoutError) as e:
                seen.append(f"{loc}: {e!r}")
                continue
            if m is None or m.num_tokens > len(tokens) or token_crc(tokens[: m.num_tokens]) != m.token_crc:
                seen.append(f"{loc}: " + ("none" if m is None else f"{m.num_tokens} tokens, no match"))
                continue
            if m.num_tokens > best:
                best, where = m.num_tokens, loc
        # Every verified token: the last block may be partial (its first n % block_size
        # slots hold the checkpoint; vLLM computes the rest of it).
        n = min(best, len(tokens) - 1)
        log.info("resilient-ep: restore of %s: checkpoint of %d of its %d tokens, %d to load "
                 "(%s)", key, best, len(tokens), max(0, n - num_computed_tokens),
                 "; ".join(seen) or "found")
        if n <= num_computed_tokens:
            return 0, False
        self._pending_loads[request.request_id] = (str(key), n, where)
        return n - num_computed_tokens, False

    def _view(self) -> tuple[int, tuple[int, ...]]:
        """(epoch, live ranks) to look for checkpoints in: this process's membership replica
        less every rank a re-admitted request came from (gone, even if the replica has not
        heard yet); the shared-memory and file stores have one location set (rank 0)."""
        if self.replica is None:
            return 0, (0,)
        v = self.replica.membership.view()
        return v.epoch, tuple(r for r in v.live_ranks if r not in self._gone)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        pending = self._pending_loads.pop(request.request_id, None)
        if pending is None or num_external_tokens <= 0:
            return
        key, n, where = pending
        block_ids = list(blocks.get_block_ids()[0])
        self._loads.append((key, list(request.all_token_ids), n, block_ids, where))
        info = self._reqs[request.request_id]
        info["saved"] = n

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = ResilientKVConnectorMetadata()
        meta.loads, self._loads = self._loads, []
        meta.forgets, self._forgets = self._forgets, []
        if self.replica is not None:
            meta.view = self._view()
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            info = self._reqs.get(new.req_id)
            if info is None:
                continue
            info["blocks"] = list(new.block_ids[0])
            self._maybe_save(meta, info, new.num_computed_tokens + sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            info = self._reqs.get(rid)
            if info is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if rid in cached.resumed_req_ids:
                    info["blocks"] = list(new_ids[0])
                else:
                    info["blocks"].extend(new_ids[0])
            self._maybe_save(meta, info, cached.num_computed_tokens[i] + sched.get(rid, 0))
        return meta

    def _maybe_save(self, meta: ResilientKVConnectorMetadata, info: dict, computed: int) -> None:
        if computed - info["saved"] < self.cfg.interval_tokens:
            return
        nb = -(-computed // self.block_size)
        tokens = list(info["request"].all_token_ids[:computed])
        meta.saves.append((info["key"], tokens, computed, info["blocks"][:nb]))
        info["saved"] = computed

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        info = self._reqs.pop(request.request_id, None)
        if info is not None and not self.keep_on_finish:
            self._forgets.append(info["key"])
        return False, None

    # ================================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        layers = [kv_caches[name] for name in kv_caches]
        self.view = LayerListView(layers, self.block_size)
        if self.replica is None:
            self.ckpt = KVCheckpointer(0, self.view, self.cfg, self.spec, members=[0]).start()
            return
        v = self.replica.membership.view()
        self.ckpt = KVCheckpointer(self.dp_rank, self.view, self.cfg, self.spec, epoch=v.epoch,
                                   members=v.live_ranks).start()
        ckpt, membership = self.ckpt, self.replica.membership
        # a lost rank's copies are gone: re-save this rank's requests to the next live ranks
        self.replica.on_loss(lambda loss: ckpt.configure(loss.epoch,
                                                         membership.view().live_ranks))

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ResilientKVConnectorMetadata)
        if meta.started:
            return  # a step re-run in place (step_rerun.py): its loads landed the first time
        meta.started = True
        if meta.view is not None and (meta.view[0] > self.ckpt.epoch or (
                meta.view[0] == self.ckpt.epoch and set(meta.view[1]) < self.ckpt.members)):
            self.ckpt.configure(*meta.view)  # the engine knows of a loss this worker has not heard
        for key in meta.forgets:
            self.ckpt.forget(key)  # before this forward can reuse its blocks
        for key, tokens, n, block_ids, where in meta.loads:
            self.ckpt.restore(key, tokens, hints=[where] if where else [])
            deadline = time.monotonic() + self.cfg.timeout_ms / 1000.0
            results = []
            while not results and time.monotonic() < deadline:
                results = [r for r in self.ckpt.restored() if r.rid == key]
                if not results:
                    time.sleep(0.0005)
            nb = -(-n // self.block_size)  # blocks holding the n tokens (the last maybe partial)
            # All n tokens verified: every block is used. Fewer (a torn or missing copy): the
            # whole blocks below them are, and vLLM recomputes from the first one that is not.
            restored, good = 0, 0
            if results and results[0].blocks is not None:
                res = results[0]
                if res.restored_tokens >= n:
                    restored, good = n, nb
                else:
                    good = res.restored_tokens // self.block_size
                    restored = good * self.block_size
                if good:
                    self.view.write(torch.tensor(block_ids[:good]), res.blocks[:good])
                self.ckpt.track_restored(dataclasses.replace(res, restored_tokens=restored),
                                         tokens, block_ids)
            self._load_errors.update(block_ids[good:nb])
            self.stats["loads"] += 1
            self.stats["external_hit_tokens"] += restored
            self.stats["load_errors"] += nb - good

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # whole blocks of every layer are saved after the forward (wait_for_save)

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if self.ckpt is None or not isinstance(meta, ResilientKVConnectorMetadata) or not meta.saves:
            return
        if sys.exc_info()[1] is not None:
            # The forward failed part-way (a lost peer: the step is re-run in place): its
            # blocks hold a mix of old and new KV. The re-run saves them once they are whole.
            return
        self.ckpt.after_step(meta.saves)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self):
        if self.ckpt is not None:
            self.ckpt.flush(time.monotonic() + 5)
            self.ckpt.shutdown()
        if self._stores is not None:
            self._stores.shutdown()
