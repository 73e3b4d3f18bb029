"""KV checkpoints in the reference runtime: the rank side (:class:`RankKV`) and the coordinator
side (:class:`KVTracker`) of :mod:`resilient_ep.kv`.

Rank: runs a peer store server (``store: peer``), a :class:`~resilient_ep.kv.KVCheckpointer`
over its paged cache, and the restores: an ``add`` carrying ``restore`` waits (off the decode
loop) for the checkpoint, whose blocks are written into this rank's cache; the request then
prefills only the tokens after it. Each step's ``tokens`` message carries ``kv``: the saves
acknowledged since the last step, restores done, counters and the checkpoint lag.

Coordinator: chooses the stores of the run, tells each rank, records per request where its
checkpoint lives and what a restore recomputed, sums the metrics for ``status()``.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from ..config import KVCheckpointConfig

__all__ = ["KVTracker", "RankKV"]


class RankKV:
    """One rank's checkpointing: store server, checkpointer, pending restores."""

    def __init__(self, rank: int, num_ranks: int, cache, spec: dict):
        from ..kv.checkpoint import KVCheckpointer
        from ..kv.locations import StoreSpec
        from ..kv.peer_store import PeerStoreServer

        self.rank = rank
        self.cache = cache
        cfg = KVCheckpointConfig(**spec["config"])
        store = StoreSpec(**{**spec["store"], "peer_endpoints": tuple(spec["store"]["peer_endpoints"]),
                             "peer_nodes": tuple(spec["store"].get("peer_nodes", ()))})
        self.server = None
        if store.kind == "peer":
            self.server = PeerStoreServer(store.peer_endpoints[rank], location=f"peer:{rank}").start()
        self.ckpt = KVCheckpointer(rank, cache, cfg, store, members=range(num_ranks)).start()
        self.restoring: dict = {}      # rid -> RankRequest waiting for its checkpoint
        self.done: list[tuple] = []    # (rid, restored, recomputed, source, ms, mismatches)
        self.hook_s = 0.0              # decode-loop time spent in step() (the critical-path cost)

    @property
    def pending(self) -> bool:
        return bool(self.restoring)

    def add(self, req, restore: dict | None) -> bool:
        """True when the request waits for a restore (it joins the scheduler in :meth:`poll`)."""
        if restore is None:
            return False
        self.restoring[req.rid] = req
        self.ckpt.restore(req.rid, req.tokens, restore.get("hints", ()))
        return True

    def drop(self, rid: str) -> None:
        self.restoring.pop(rid, None)

    def forget(self, rid: str) -> None:
        self.ckpt.forget(rid)

    def configure(self, epoch: int, live) -> None:
        if self.server is not None:
            self.server.configure(epoch, live)
        self.ckpt.configure(epoch, live)

    def set_paused(self, paused: bool) -> None:
        self.ckpt.paused = paused

    def poll(self, sched) -> None:
        """Move finished restores into the scheduler (their blocks into the cache)."""
        from ..kv.meta import from_block_major

        if not self.restoring:
            return
        results = self.ckpt.restored()
        if self.ckpt.errored() is not None:  # the checkpointer broke: recompute, never hang
            for req in self.restoring.values():
                sched.add(req)
                self.done.append((req.rid, 0, max(0, len(req.tokens) - 1), None, 0.0, 0))
            self.restoring.clear()
            return
        for res in results:
            req = self.restoring.pop(res.rid, None)
            if req is None:
                continue  # dropped while it was being restored
            table = self.cache.reserve(req.rid, len(req.tokens))
            if res.restored_tokens:
                self.cache.write_blocks(table[: res.blocks.shape[0]], from_block_major(res.blocks))
                req.num_cached = res.restored_tokens
            self.ckpt.track_restored(res, req.tokens, table)
            sched.add(req)
            self.done.append((res.rid, res.restored_tokens, res.recomputed_tokens, res.source,
                              res.seconds * 1000, res.checksum_mismatches))

    def step(self, sched, plan_requests) -> dict:
        """After a step: queue due saves; the ``kv`` part of the step's message."""
        t0 = time.perf_counter()
        running = sched.running
        self.ckpt.after_step((r.rid, r.tokens, r.num_cached, lambda rid=r.rid: self.cache.block_table(rid))
                             for r in plan_requests if r.rid in running)
        rep = self.ckpt.report()
        rep["restored"], self.done = self.done, []
        self.hook_s += time.perf_counter() - t0
        rep["counters"]["hook_s"] = self.hook_s
        rep["counters"]["server_cpu_s"] = self.server.cpu_s if self.server is not None else 0.0
        return rep

    def shutdown(self) -> None:
        self.ckpt.shutdown(timeout=3.0)
        if self.server is not None:
            self.server.shutdown()


class KVTracker:
    """Coordinator side: the run's stores, per-request checkpoint records, summed metrics."""

    def __init__(self, config: KVCheckpointConfig, num_ranks: int, run_dir: Path, *, enabled: bool):
        self.config = config
        self.enabled = enabled
        self.num_ranks = num_ranks
        self.run_dir = Path(run_dir)
        self.requests: dict[str, dict] = {}
        """Per request: ``tokens`` (covered by the last acknowledged save), ``locations``,
        and after a restore ``restored`` / ``recomputed`` tokens and ``source``."""
        self.ranks: dict[int, dict] = {}
        self.full_recomputes_without_checkpointing = 0
        self.recomputed_without_checkpointing = 0
        self._samples: deque = deque(maxlen=64)
        self._own_dirs: list[Path] = []
        self._store: dict | None = None
        self._peers: list[str] | None = None
        self._peer_nodes: list[int] = []

    def set_peers(self, endpoints: list[str], nodes: list[int]) -> None:
        """Where each rank's peer store listens, and each rank's node (several hosts: the
        copies go to other nodes first); before :meth:`rank_spec`."""
        self._peers, self._peer_nodes = list(endpoints), list(nodes)

    def rank_spec(self) -> dict | None:
        """``kv_checkpoint`` of each rank's spec (None: off)."""
        if not self.enabled:
            return None
        if self._store is None:
            from ..kv.dir_store import default_shm_dir
            from ..kv.peer_store import peer_endpoint

            kind = self.config.store
            base = ""
            if kind == "shm":
                base = default_shm_dir(f"{self.run_dir.name}-kv")
                self._own_dirs.append(base)
            elif kind == "file":
                base = Path(self.config.path) if self.config.path else self.run_dir / "kv-files"
                if not self.config.path:
                    self._own_dirs.append(base)
            peers = self._peers or [peer_endpoint(str(self.run_dir), r)
                                    for r in range(self.num_ranks)]
            self._store = {"kind": kind, "replicas": self.config.replicas, "base_dir": str(base),
                           "peer_endpoints": peers, "peer_nodes": self._peer_nodes}
        return {"config": asdict(self.config), "store": self._store}

    def restore_hint(self, rid: str, tokens: int) -> dict | None:
        """The ``restore`` field of an ``add`` that moves a request after a failure."""
        if not self.enabled:
            self.full_recomputes_without_checkpointing += 1
            self.recomputed_without_checkpointing += max(0, tokens - 1)  # as RestoreResult counts
            return None
        info = self.requests.get(rid, {})
        return {"hints": list(info.get("locations", ()))}

    def on_report(self, rank: int, kv: dict, owner_of) -> None:
        """A rank's ``kv`` report; ``owner_of(rid)`` is the request's current owner."""
        self.ranks[rank] = {k: v for k, v in kv.items() if k not in ("acks", "restored")}
        for rid, n, epoch, locations in kv.get("acks", ()):
            if owner_of(rid) == rank:
                info = self.requests.setdefault(rid, {})
                info.update(tokens=n, epoch=epoch, locations=list(locations))
        for rid, restored, recomputed, source, ms, mismatches in kv.get("restored", ()):
            info = self.requests.setdefault(rid, {})
            info.update(restored=restored, recomputed=recomputed, source=source, restore_ms=ms,
                        checksum_mismatches=mismatches, restored_on=rank)
        self._samples.append((time.monotonic(), self._total("bytes")))

    def _total(self, key: str) -> float:
        return sum(r["counters"].get(key, 0) for r in list(self.ranks.values()))

    def status(self, live=None) -> dict:
        cfg = self.config
        out = {"enabled": self.enabled, "store": cfg.store, "replicas": cfg.replicas,
               "interval_tokens": cfg.interval_tokens}
        if not self.enabled:
            out.update(restores=0, full_recomputes=self.full_recomputes_without_checkpointing,
                       recomputed_tokens=self.recomputed_without_checkpointing)
            return out
        keys = ("saves", "save_errors", "bytes", "blocks", "restores", "restored_from_checkpoint",
                "full_recomputes", "restored_tokens", "recomputed_tokens", "checksum_mismatches",
                "lag_waits")
        out.update({k: int(self._total(k)) for k in keys})
        for k in ("io_cpu_s", "server_cpu_s", "hook_s", "lag_wait_s"):
            out[k] = float(self._total(k))
        ranks = dict(self.ranks)
        live_reports = [r for k, r in ranks.items() if live is None or k in live]
        out["lag_tokens_max"] = max((r["lag_tokens_max"] for r in live_reports), default=0)
        out["lag_tokens_max_seen"] = max((r["lag_tokens_max_seen"] for r in ranks.values()), default=0)
        n = sum(r["tracked"] for r in live_reports)
        out["lag_tokens_mean"] = (sum(r["lag_tokens_mean"] * r["tracked"] for r in live_reports) / n) if n else 0.0
        s = list(self._samples)
        recent = [x for x in s if x[0] >= s[-1][0] - 10.0] if s else []
        out["bytes_per_s"] = ((recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
                              if len(recent) >= 2 and recent[-1][0] > recent[0][0] else 0.0)
        out["errors"] = {k: r["error"] for k, r in ranks.items() if r.get("error")}
        r = out["restores"]
        out["recomputed_tokens_per_restore"] = out["recomputed_tokens"] / r if r else 0.0
        out["restore_ms_mean"] = (self._total("restore_ms_total") / r) if r else 0.0
        return out

    def cleanup(self) -> None:
        for d in self._own_dirs:
            shutil.rmtree(d, ignore_errors=True)
