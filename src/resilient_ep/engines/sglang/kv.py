"""KV checkpoints on SGLang: the core's :class:`~resilient_ep.kv.KVCheckpointer` over SGLang's
token-level KV pool, so a lost rank's requests resume on a survivor from their KV instead of
prefilling prompt + generated tokens again.

- **Save** (every scheduler, after each step: ``after_step``): every running decode request
  whose KV is ``kv_checkpoint.interval_tokens`` ahead of its last save is checkpointed by the
  core's background I/O thread (incremental: only the new tokens; checksummed) to
  ``kv_checkpoint.store``: ``peer`` (the default: the next ``replicas`` live ranks' memory,
  each scheduler serving a :class:`~resilient_ep.kv.peer_store.PeerStoreServer` on
  ``ipc://<instance dir>/kvstore-<rank>``), ``shm`` (``/dev/shm``, one host) or ``file``.
  Checkpoints are keyed by the request's id as the client knows it, so every incarnation of a
  moved request continues the same checkpoint.
- **Restore** (the scheduler a moved request lands on: ``restore_into_tree``): before the
  request is scheduled, the newest verified checkpoint is read, written into freshly
  allocated KV slots and inserted into SGLang's radix cache under the request's tokens;
  SGLang's own prefix matching then serves that prefix and computes only the tail.

SGLang's KV pool (``MHATokenToKVPool``) holds one row per token slot in every layer
(``k_buffer[l] [slots, heads, dim]``, ``v_buffer[l]``): :class:`TokenView` shows it to the core
as blocks of one token, ``[layers, 2, heads, dim]`` each.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from array import array
from typing import Any

import torch

from resilient_ep.kv import KVCheckpointer, StoreSpec
from resilient_ep.kv.peer_store import PeerStoreServer, peer_endpoint

from ..common.instance import join_instance
from .instance import base_rid

__all__ = ["TokenView", "store_spec", "SglangCheckpoints", "current", "serve_peer_store",
           "base_rid"]

log = logging.getLogger(__name__)


class TokenView:
    """SGLang's per-layer K and V buffers as blocks of one token: ``read(ids [n])`` ->
    ``[n, L, 2, heads, dim]`` (a copy), ``write(ids, blocks)``."""

    block_size = 1

    def __init__(self, k_buffers, v_buffers):
        self.k, self.v = list(k_buffers), list(v_buffers)
        if not self.k or len(self.k) != len(self.v):
            raise ValueError("the KV pool needs as many K as V buffers, at least one")
        shape = tuple(self.k[0].shape[1:])
        if any(tuple(t.shape[1:]) != shape for t in self.k + self.v):
            raise ValueError("every K and V buffer must have one [heads, dim] shape")
        self.block_shape = (len(self.k), 2, *shape)
        self.dtype = self.k[0].dtype
        self.device = self.k[0].device

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        return torch.stack([torch.stack([k.index_select(0, ids), v.index_select(0, ids)], dim=1)
                            for k, v in zip(self.k, self.v)], dim=1)

    def write(self, ids: torch.Tensor, blocks: torch.Tensor) -> None:
        ids = ids.to(self.device)
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            k.index_copy_(0, ids, blocks[:, layer, 0].to(self.device, self.dtype))
            v.index_copy_(0, ids, blocks[:, layer, 1].to(self.device, self.dtype))


def store_spec(cfg, instance: str, size: int) -> StoreSpec:
    """Where this instance's checkpoints go (``kv_checkpoint.store``)."""
    kv = cfg.kv_checkpoint
    if kv.store == "peer":
        run_dir = str(join_instance(instance))
        return StoreSpec("peer", kv.replicas,
                         peer_endpoints=tuple(peer_endpoint(run_dir, r) for r in range(size)))
    if kv.store == "file":
        base = kv.path or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                       f"resilient-ep-{os.getuid()}", instance, "kv")
    else:
        base = f"/dev/shm/resilient-ep-{os.getuid()}/{instance}/kv"
    return StoreSpec(kv.store, kv.replicas, base_dir=base)


_server: PeerStoreServer | None = None


def serve_peer_store(cfg, instance: str, rank: int, size: int) -> None:
    """This scheduler's peer store (its peers' checkpoint copies), once per process."""
    global _server
    if _server is not None or cfg.kv_checkpoint.store != "peer" or not cfg.kv_checkpoint.enabled:
        return
    spec = store_spec(cfg, instance, size)
    _server = PeerStoreServer(spec.peer_endpoints[rank], location=f"peer:{rank}").start()


class SglangCheckpoints:
    """One scheduler's checkpoints: the core's checkpointer over its KV pool."""

    def __init__(self, scheduler: Any, cfg, instance: str, rank: int, size: int,
                 live: list[int], epoch: int):
        pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
        self.view = TokenView(pool.k_buffer, pool.v_buffer)
        # Decoding is never held back for a save (kv_checkpoint.max_stall_ms is refused on
        # SGLang): a restore takes the newest verified copy, however far behind.
        self.cfg = dataclasses.replace(cfg.kv_checkpoint, max_stall_ms=0.0)
        self.ckpt = KVCheckpointer(rank, self.view, self.cfg, store_spec(cfg, instance, size),
                                   epoch=epoch, members=live).start()
        self.tracked: set[str] = set()
        self.restores: list[dict] = []
        self.step_errors = 0
        """Steps whose checkpoint bookkeeping raised (logged the first times; never fatal)."""

    # --------------------------------------------------------------- saving
    def after_step(self, scheduler: Any, batch: Any) -> None:
        """Queue a save of each running decode request that is due; forget finished ones."""
        if batch is None or not batch.forward_mode.is_decode():
            self._forget_finished(batch)
            return
        table = scheduler.req_to_token_pool.req_to_token
        items = []
        for req in batch.reqs:
            if req.finished():
                continue
            tokens = list(req.origin_input_ids) + list(req.output_ids)
            cached = len(tokens) - 1  # the newest token is the next step's input
            rid = base_rid(req.rid)
            self.tracked.add(rid)
            idx = req.kv.req_pool_idx
            items.append((rid, tokens, cached,
                          lambda idx=idx, n=cached: table[idx, :n].to(torch.int64).tolist()))
        if items:
            self.ckpt.after_step(items)
        self._forget_finished(batch)

    def _forget_finished(self, batch: Any) -> None:
        if batch is None:
            return
        for req in batch.reqs:
            if req.finished():
                rid = base_rid(req.rid)
                if rid in self.tracked:
                    self.tracked.discard(rid)
                    self.ckpt.forget(rid)

    def configure(self, epoch: int, live: list[int]) -> None:
        self.ckpt.configure(epoch, live)

    # --------------------------------------------------------------- restoring
    def restore_into_tree(self, scheduler: Any, req: Any, from_rank: int | None = None) -> int:
        """Load ``req``'s newest verified checkpoint into SGLang's radix cache (before the
        request is scheduled); returns the tokens restored (0: it recomputes)."""
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        rid = base_rid(req.rid)
        tokens = list(req.origin_input_ids)
        t0 = time.monotonic()
        self.ckpt.restore(rid, tokens)
        deadline = t0 + 3 * self.cfg.timeout_ms / 1000.0
        res = None
        while res is None and time.monotonic() < deadline:
            for r in self.ckpt.restored():
                if r.rid == rid:
                    res = r
            if res is None:
                time.sleep(0.002)
        record = {"rid": rid, "tokens": len(tokens), "restored": 0, "source": None,
                  "seconds": round(time.monotonic() - t0, 4)}
        self.restores.append(record)
        if res is None or not res.restored_tokens:
            return 0
        n = res.restored_tokens
        key = RadixKey(array("q", tokens[:n]), req.extra_key,
                       cache_salt=getattr(req, "cache_salt", None))
        tree = scheduler.tree_cache
        allocator = scheduler.token_to_kv_pool_allocator
        slots = allocator.alloc(n)
        if slots is None:
            log.warning("resilient-ep: no free KV slots to restore %s (%d tokens): recompute",
                        rid, n)
            return 0
        self.view.write(slots, res.blocks.reshape(n, *self.view.block_shape))
        try:
            got = tree.insert(InsertParams(key=key, value=slots.to(torch.int64)))
        except BaseException:
            allocator.free(slots)
            raise
        if got.prefix_len and not hasattr(tree, "tree_core"):
            # Part of it was in the tree already (e.g. a shared first word): SGLang's plain
            # radix cache leaves the duplicates to the caller (its unified cache frees them
            # itself, as its own inserts rely on).
            allocator.free(slots[:got.prefix_len])
        record["in_tree"] = int(got.prefix_len)
        # Checkpointed from here on, from its own KV row (the first save is a full copy), and
        # the copy it came from is deleted when it ends. (Not from ``slots``: the tree may
        # have freed the part of them it already held.)
        self.ckpt.track_restored(dataclasses.replace(res, restored_tokens=0, blocks=None),
                                 tokens, [])
        self.tracked.add(rid)
        record.update(restored=n, source=res.source)
        log.info("resilient-ep: %s resumes from its KV checkpoint (%d of %d tokens, from %s)",
                 req.rid, n, len(tokens), res.source)
        return n

    def status(self) -> dict:
        rep = self.ckpt.report()
        return {"counters": rep["counters"], "lag_tokens_max": rep["lag_tokens_max"],
                "step_errors": self.step_errors, "error": rep["error"],
                "restores": self.restores[-16:]}


_current: SglangCheckpoints | None = None


def current() -> SglangCheckpoints | None:
    return _current


def checkpoints_for(scheduler: Any) -> SglangCheckpoints | None:
    """This scheduler's checkpoints (made on first use, when the KV pool exists)."""
    global _current
    if _current is None:
        from . import groups
        from .instance import current as settings

        cfg, instance = settings()
        if not cfg.kv_checkpoint.enabled:
            return None
        g = groups.current_group()
        if g is None:
            return None
        _current = SglangCheckpoints(scheduler, cfg, instance, g.rank, g.size, g.live, g.epoch)
        groups.add_listener(lambda dead, epoch: _current.configure(epoch, [
            r for r in range(g.size) if r not in dead]))
    return _current
