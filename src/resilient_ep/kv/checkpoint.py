"""Asynchronous, incremental KV checkpoints of every running request, and per-request restore.

One :class:`KVCheckpointer` per attention worker. The decode loop calls :meth:`after_step` once
per step (microseconds: it only decides which requests are due and queues a save); one
background I/O thread copies the changed blocks out of the paged cache, checksums them and
writes them to the replica stores. A request is due when ``interval_tokens`` tokens were cached
since its last save, so a checkpoint trails the cache by at most ``interval_tokens`` tokens plus
the time the I/O thread needs (the ``lag`` metrics). Pending saves of one request coalesce.

Copies off the critical path:
- CPU: the I/O thread reads the blocks itself, under a lock that :meth:`forget` takes before
  the owner frees a finished request's blocks (a freed block can be reused at once). Positions
  written after the save was queued may be torn in the copy; they are past ``num_tokens``, never
  read on restore (a restore recomputes from ``num_tokens`` on and overwrites them).
- GPU: the decode loop records an event; the I/O thread copies on a side stream into pinned host
  memory after that event; :meth:`forget` orders the main stream after the side stream.

Restore (:meth:`restore`, :meth:`restored`) runs on the same thread, ahead of saves: it looks at
the hinted locations, then every candidate, reads the metadata, checks the token sequence
(``token_crc``) and fetches the best; blocks are verified against their checksums and the
longest verified prefix is used; a mismatch falls back to another replica, then to recompute.

Lifecycle: ``start()``, ``configure(epoch, members)`` (re-targets replicas: a new target gets a
full copy at once), ``abort()``, ``errored()``, ``shutdown()``. The checkpointer never imports a
runtime: the cache is a view of :mod:`.cache_views` (or anything with ``kv [L, 2, NB, BS, KVH, D]``
and ``block_size``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import KVCheckpointConfig
from .locations import StoreSet, StoreSpec
from .cache_views import as_view
from .meta import CheckpointMeta, block_crcs, token_crc, verified_blocks
from .store import StoreError

__all__ = ["KVCheckpointer", "RestoreResult"]


@dataclass
class RestoreResult:
    rid: str
    num_tokens: int
    """Tokens of the request at restore time (prompt plus generated)."""
    restored_tokens: int
    """Positions ``0 .. restored_tokens-1`` come from the checkpoint; 0: full recompute."""
    blocks: torch.Tensor | None
    """Block-major ``[n, L, 2, BS, KVH, D]`` (CPU), ``n = ceil(restored_tokens / BS)``."""
    source: str | None
    locations: list[str]
    """Every location that held a copy (to delete when the request ends)."""
    seconds: float
    checksum_mismatches: int = 0
    """Replicas whose blocks failed verification (a fallback was used)."""

    @property
    def recomputed_tokens(self) -> int:
        """Tokens whose K/V the old owner had computed and this one computes again: every
        token but the last (which no rank has processed yet: it is the next decode input,
        failure or not) that the checkpoint does not cover."""
        return max(0, self.num_tokens - 1 - self.restored_tokens)


@dataclass
class _Req:
    rid: str
    cached: int = 0
    crc: int = 0
    crc_tokens: int = 0
    enqueued: int = 0
    acked: int = 0
    last: "_Save | None" = None
    failed: bool = False                             # the last save reached no replica
    synced: dict = field(default_factory=dict)       # location -> tokens held there (I/O thread)
    checksums: list = field(default_factory=list)    # per block (I/O thread)
    locations: set = field(default_factory=set)      # everywhere a copy may be


@dataclass
class _Save:
    rid: str
    num_tokens: int
    token_crc: int
    block_ids: tuple
    event: object = None


class KVCheckpointer:
    def __init__(self, owner: int, cache, config: KVCheckpointConfig, spec: StoreSpec, *,
                 epoch: int = 0, members: Iterable[int] | None = None, ctx=None):
        self.owner = owner
        self.cache = cache
        self.config = config
        self.spec = spec
        self.block_size = cache.block_size
        self.view = as_view(cache)  # whole blocks in and out (kv/cache_views.py)
        self.block_shape = tuple(self.view.block_shape)
        self.dtype = str(self.view.dtype).removeprefix("torch.")
        self.cuda = self.view.device.type == "cuda"
        self._side = torch.cuda.Stream(device=self.view.device) if self.cuda else None
        self.epoch = epoch
        self.members = frozenset(members if members is not None else [owner])
        self.stores = StoreSet(spec, ctx=ctx)
        self.stores.configure(epoch, self.members)
        self.paused = False
        """True: :meth:`after_step` does nothing (checkpointing off without a restart)."""
        self._reqs: dict[str, _Req] = {}
        self._lock = threading.Lock()          # _reqs membership vs the I/O thread's block reads
        self._cv = threading.Condition()
        self._saves: OrderedDict[str, _Save] = OrderedDict()
        self._deletes: deque = deque()
        self._restores: deque = deque()
        self._done: list[RestoreResult] = []
        self._acks: list[tuple] = []
        self._busy = False
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.counters = {"saves": 0, "save_errors": 0, "bytes": 0, "blocks": 0, "restores": 0,
                         "restored_from_checkpoint": 0, "full_recomputes": 0, "restored_tokens": 0,
                         "recomputed_tokens": 0, "checksum_mismatches": 0, "restore_ms_total": 0.0,
                         "io_cpu_s": 0.0, "lag_waits": 0, "lag_wait_s": 0.0}
        self.lag_max_seen = 0

    # ================================================================== lifecycle
    def start(self) -> "KVCheckpointer":
        self._thread = threading.Thread(target=self._run, name=f"kv-ckpt-{self.owner}", daemon=True)
        self._thread.start()
        return self

    def configure(self, epoch: int, members: Iterable[int]) -> None:
        """New membership: replicas follow the live ranks; every request is re-saved at once
        (only to targets that lack it: a new target gets a full copy, old ones nothing)."""
        self.stores.abort_outside(members)
        with self._cv:
            self.epoch, self.members = epoch, frozenset(members)
            for r in self._reqs.values():
                if r.last is not None and r.rid not in self._saves:
                    self._saves[r.rid] = r.last
            self._cv.notify()

    def abort(self) -> None:
        """Stop the I/O thread; a store call in flight is interrupted."""
        for s in list(self.stores._open.values()):
            s.abort()
        with self._cv:
            self._stop = True
            self._cv.notify()

    def errored(self) -> BaseException | None:
        return self._error

    def shutdown(self, timeout: float = 5.0) -> None:
        self.abort()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.stores.shutdown()

    def flush(self, deadline: float) -> bool:
        """Wait until every queued job is done (tests, benchmarks); False at the deadline."""
        with self._cv:
            while self._saves or self._deletes or self._restores or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    # ================================================================== decode loop side
    def after_step(self, requests: Iterable[tuple[str, Sequence[int], int, Sequence[int] | None]]) -> int:
        """Once per step: ``(rid, tokens, num_cached, block_table)`` of each running request
        (``block_table`` may be None when the request is not due: it is asked for lazily as a
        callable too). Queues a save of each request whose cache is ``interval_tokens`` ahead
        of its last save; returns how many were queued."""
        if self.paused:
            return 0
        due: list[_Save] = []
        event = None
        seen = []
        for rid, tokens, cached, table in requests:
            r = self._reqs.get(rid)
            if r is None:
                with self._lock:
                    r = self._reqs[rid] = _Req(rid)
            r.cached = cached
            seen.append(r)
            if cached - r.enqueued < self.config.interval_tokens:
                continue
            if callable(table):
                table = table()
            r.crc = token_crc(tokens[r.crc_tokens:cached], r.crc)
            r.crc_tokens = cached
            nb = -(-cached // self.block_size)
            if self.cuda and event is None:
                event = torch.cuda.Event()
                event.record()
            save = _Save(rid, cached, r.crc, tuple(table[:nb]), event)
            r.enqueued, r.last = cached, save
            due.append(save)
        if due:  # one hand-over (and one wake-up of the I/O thread) per step
            with self._cv:
                for save in due:
                    self._saves[save.rid] = save
                    self._saves.move_to_end(save.rid)
                self._cv.notify()
        self._bound_lag(seen)
        return len(due)

    def _behind(self, r: _Req) -> bool:
        return r.cached - r.acked > self.config.interval_tokens and not r.failed and r.rid in self._reqs

    def _bound_lag(self, reqs: list) -> None:
        """Backpressure: a request whose cache would run more than ``interval_tokens`` ahead of
        its acknowledged checkpoint waits (at most ``max_stall_ms``) for its save in flight."""
        if self.config.max_stall_ms <= 0 or not any(self._behind(r) for r in reqs):
            return
        if not self.spec.targets(self.owner, self.members):
            return  # nowhere to save (a world of one)
        t0 = time.perf_counter()
        deadline = t0 + self.config.max_stall_ms / 1000.0
        with self._cv:
            while any(self._behind(r) for r in reqs):
                left = deadline - time.perf_counter()
                if left <= 0 or self._error is not None:
                    break
                self._cv.wait(left)
        self.counters["lag_waits"] += 1
        self.counters["lag_wait_s"] += time.perf_counter() - t0

    def forget(self, rid: str) -> None:
        """The request ended (finished, dropped): its blocks may be freed as soon as this
        returns; its checkpoint copies are deleted in the background."""
        with self._lock:
            r = self._reqs.pop(rid, None)
            if self.cuda:
                torch.cuda.current_stream().wait_stream(self._side)
        if r is None:
            return
        with self._cv:
            self._saves.pop(rid, None)
            self._deletes.append((rid, set(r.synced) | r.locations))
            self._cv.notify()

    def restore(self, rid: str, tokens: Sequence[int], hints: Sequence[str] = ()) -> None:
        """Look for ``rid``'s checkpoint in the background; see :meth:`restored`."""
        with self._cv:
            self._restores.append((rid, list(tokens), list(hints), self.epoch, self.members))
            self._cv.notify()

    def restored(self) -> list[RestoreResult]:
        """Finished restores (drained). The caller writes ``blocks`` into its cache, then calls
        :meth:`track_restored`."""
        with self._cv:
            out, self._done = self._done, []
        return out

    def track_restored(self, res: RestoreResult, tokens: Sequence[int], block_table: Sequence[int]) -> None:
        """Start checkpointing a restored request here: its blocks go to this rank's replica
        targets at once; the old copies are deleted when it ends."""
        # acked: the copy it was restored from still exists (until this rank saves its own).
        r = _Req(res.rid, cached=res.restored_tokens, acked=res.restored_tokens,
                 locations=set(res.locations))
        if res.restored_tokens:
            n = res.restored_tokens
            r.crc, r.crc_tokens, r.enqueued = token_crc(tokens[:n]), n, n
            nb = -(-n // self.block_size)
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record()
            r.last = _Save(res.rid, n, r.crc, tuple(block_table[:nb]), event)
        with self._lock:
            self._reqs[res.rid] = r
        if r.last is not None and not self.paused:
            with self._cv:
                self._saves[res.rid] = r.last
                self._cv.notify()

    def report(self) -> dict:
        """Metrics for the status endpoint; drains the acknowledgements
        ``(rid, num_tokens, epoch, [locations])`` of saves since the last report."""
        with self._cv:
            acks, self._acks = self._acks, []
        lags = [r.cached - r.acked for r in list(self._reqs.values())]
        lag_max = max(lags, default=0)
        self.lag_max_seen = max(self.lag_max_seen, lag_max)
        return {"acks": acks, "counters": dict(self.counters), "lag_tokens_max": lag_max,
                "lag_tokens_mean": (sum(lags) / len(lags)) if lags else 0.0,
                "lag_tokens_max_seen": self.lag_max_seen, "tracked": len(lags),
                "queued": len(self._saves),
                "error": repr(self._error) if self._error is not None else None}

    # ================================================================== I/O thread
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stop or self._restores or self._deletes or self._saves):
                        self._busy = False
                        self._cv.notify_all()
                        self._cv.wait()
                    if self._stop:
                        return
                    self._busy = True
                    if self._restores:
                        job = ("restore", self._restores.popleft())
                    elif self._deletes:
                        job = ("delete", self._deletes.popleft())
                    else:  # every pending save at once: one gather, one copy (one sync on GPU)
                        job = ("save", [self._saves.popitem(last=False)[1]
                                        for _ in range(min(len(self._saves), 256))])
                    epoch, members = self.epoch, self.members
                cpu0 = time.thread_time()
                if self.stores.members != members or self.stores.epoch != epoch:
                    self.stores.configure(epoch, members)
                if job[0] == "restore":
                    res = self._do_restore(*job[1])
                    with self._cv:
                        self._done.append(res)
                elif job[0] == "delete":
                    self._do_delete(*job[1])
                else:
                    self._do_saves(job[1], epoch, members)
                self.counters["io_cpu_s"] += time.thread_time() - cpu0
        except BaseException as e:  # surfaced through errored()
            self._error = e
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
            self.stores.shutdown()

    def _deadline(self) -> float:
        return time.monotonic() + self.config.timeout_ms / 1000.0

    def _read(self, parts: list[tuple[_Save, int]]) -> list[torch.Tensor | None]:
        """Blocks ``first ..`` of each save, block-major on the CPU, in one gather (and on GPU
        one device-to-host copy); None for a request that ended."""
        view = self.view
        with self._lock:
            live = [(s, f) for s, f in parts if s.rid in self._reqs]
            if not live:
                return [None] * len(parts)
            ids = torch.tensor([b for s, f in live for b in s.block_ids[f:]], dtype=torch.long)
            if not self.cuda:
                host = view.read(ids)
            else:
                with torch.cuda.stream(self._side):
                    ids = ids.to(view.device, non_blocking=True)
                    for ev in {id(s.event): s.event for s, _ in live if s.event is not None}.values():
                        self._side.wait_event(ev)
                    dev = view.read(ids)
                    host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
                    host.copy_(dev, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._side)
        if self.cuda:
            done.synchronize()
        out, i = {}, 0
        for s, f in live:
            n = len(s.block_ids) - f
            out[id(s)] = host[i:i + n]
            i += n
        return [out.get(id(s)) for s, _ in parts]

    def _do_save(self, save: _Save, epoch: int, members: frozenset) -> None:
        self._do_saves([save], epoch, members)

    def _do_saves(self, saves: list[_Save], epoch: int, members: frozenset) -> None:
        targets = self.spec.targets(self.owner, members)
        plans = []
        for save in saves:
            r = self._reqs.get(save.rid)
            if r is None:
                continue
            for t in [t for t in r.synced if t not in targets]:
                del r.synced[t]  # a rank that left (and may rejoin empty) gets a full copy next time
            firsts = {t: min(r.synced.get(t, 0), save.num_tokens) // self.block_size for t in targets
                      if r.synced.get(t, 0) < save.num_tokens}
            if not firsts:
                r.failed = not targets
                r.acked = max(r.acked, save.num_tokens) if targets else r.acked
                continue
            plans.append((save, r, firsts, min(firsts.values())))
        blocks = self._read([(save, first) for save, _, _, first in plans]) if plans else []
        for (save, r, firsts, first), b in zip(plans, blocks):
            if b is not None:
                self._finish_save(save, r, targets, firsts, first, b, epoch, members)
        with self._cv:
            self._cv.notify_all()  # the decode loop may wait for these saves (_bound_lag)

    def _finish_save(self, save: _Save, r: _Req, targets: list, firsts: dict, first: int,
                     blocks: torch.Tensor, epoch: int, members: frozenset) -> None:
        bs = self.block_size
        nb = len(save.block_ids)
        crcs = block_crcs(blocks)
        del r.checksums[first:]
        r.checksums.extend(crcs)
        if len(r.checksums) != nb:  # a new target and stale checksums: recompute from scratch
            return self._resend_all(r, save, epoch, members)
        meta = CheckpointMeta(save.rid, save.num_tokens, bs, epoch, self.owner, save.block_ids,
                              tuple(r.checksums), save.token_crc, self.block_shape, self.dtype)
        ok = []
        for t, f in firsts.items():
            part = blocks[f - first:]
            try:
                self.stores.get(t).put(meta, f, part, self._deadline())
            except (StoreError, TimeoutError):
                self.counters["save_errors"] += 1
                r.synced.pop(t, None)  # next save sends it everything
                continue
            r.synced[t] = save.num_tokens
            ok.append(t)
            self.counters["bytes"] += part.numel() * part.element_size()
            self.counters["blocks"] += part.shape[0]
        r.failed = not ok
        if ok:
            self.counters["saves"] += 1
            r.acked = max(r.acked, save.num_tokens)
            held = [t for t in targets if r.synced.get(t, 0) >= save.num_tokens]
            with self._cv:
                self._acks.append((save.rid, save.num_tokens, epoch, held))

    def _resend_all(self, r: _Req, save: _Save, epoch: int, members: frozenset) -> None:
        r.checksums.clear()
        r.synced.clear()
        self._do_save(save, epoch, members)

    def _do_delete(self, rid: str, locations: set) -> None:
        for loc in sorted(locations):
            try:
                self.stores.get(loc).delete(rid, self._deadline())
            except (StoreError, TimeoutError):
                pass

    def _do_restore(self, rid: str, tokens: list, hints: list, epoch: int, members: frozenset) -> RestoreResult:
        t0 = time.perf_counter()
        limit = len(tokens) - 1  # the last token is fed to the model anyway: it yields the logits
        live = self.spec.candidates(members)  # hints only order them: a dead rank's store is gone
        locations = [loc for loc in dict.fromkeys([*hints, *live]) if loc in live]
        found: list[tuple[CheckpointMeta, str]] = []
        for loc in locations:
            try:
                m = self.stores.get(loc).head(rid, self._deadline())
            except (StoreError, TimeoutError, ValueError):
                continue
            if m is not None:
                found.append((m, loc))
        held = [loc for _, loc in found]
        usable = [(m, loc) for m, loc in found if self._compatible(m, tokens)]
        usable.sort(key=lambda x: -x[0].num_tokens)
        best_n, best_blocks, best_loc, corrupt = 0, None, None, 0
        for m, loc in usable:
            if min(m.num_tokens, limit) <= best_n:
                break
            try:
                got = self.stores.get(loc).get(rid, self._deadline())
            except (StoreError, TimeoutError):
                continue
            if got is None or not self._compatible(got[0], tokens):
                continue
            meta, blocks = got
            k = verified_blocks(meta, blocks)
            if k < min(blocks.shape[0], meta.num_blocks):
                corrupt += 1  # a block whose bytes do not match its checksum: use the prefix
            n = min(meta.num_tokens, k * self.block_size, limit)
            if n > best_n:
                best_n, best_loc = n, loc
                best_blocks = blocks[: -(-n // self.block_size)]
            if n == min(meta.num_tokens, limit):
                break
        dt = time.perf_counter() - t0
        c = self.counters
        c["restores"] += 1
        c["restored_from_checkpoint" if best_n else "full_recomputes"] += 1
        c["restored_tokens"] += best_n
        c["recomputed_tokens"] += max(0, len(tokens) - 1 - best_n)
        c["checksum_mismatches"] += corrupt
        c["restore_ms_total"] += dt * 1000
        return RestoreResult(rid, len(tokens), best_n, best_blocks, best_loc, held, dt, corrupt)

    def _compatible(self, m: CheckpointMeta, tokens: list) -> bool:
        return (0 < m.num_tokens <= len(tokens) and m.block_size == self.block_size
                and tuple(m.block_shape) == self.block_shape and m.dtype == self.dtype
                and token_crc(tokens[: m.num_tokens]) == m.token_crc)
