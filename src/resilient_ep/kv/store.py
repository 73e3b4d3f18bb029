"""The checkpoint store interface and the in-memory store (which the peer store serves).

Every store holds, per request id, one :class:`~.meta.CheckpointMeta` and the blocks
``0 .. meta.num_blocks-1`` (block-major ``[n, L, 2, BS, KVH, D]``). A save is incremental:
``put(meta, first, blocks)`` writes blocks ``first .. first+n-1`` and then the metadata, so a
reader sees the old metadata until the new blocks are in (checksums catch anything torn).

Lifecycle (as every I/O part of the core): ``configure(epoch, members)``: the epoch and the ranks
whose saves are accepted (a fenced rank's late saves are refused); ``abort()`` interrupts a
blocked call; ``errored()``: the first error that broke the store; ``shutdown()``. Every call
that can block takes ``deadline`` (``time.monotonic()`` seconds) and raises ``TimeoutError``
past it; a store that cannot be reached raises :class:`StoreError`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

from .meta import CheckpointMeta, _dtype

__all__ = ["CheckpointStore", "MemoryStore", "StoreError", "check_put"]


class StoreError(RuntimeError):
    """A store refused a call or cannot be reached."""


class CheckpointStore(ABC):
    """The lifecycle is shared: ``configure`` sets the epoch and members (and re-arms after
    ``abort``); ``abort`` makes blocking calls give up; ``errored`` is the first I/O error."""

    location: str = "?"
    epoch: int = 0
    members: frozenset[int] | None = None
    _error: Exception | None = None
    _aborted: bool = False

    def configure(self, epoch: int, members: Iterable[int]) -> None:
        self.epoch, self.members = epoch, frozenset(members)
        self._aborted = False

    def abort(self) -> None:
        self._aborted = True

    def errored(self) -> Exception | None:
        return self._error

    def shutdown(self) -> None:
        pass

    @abstractmethod
    def put(self, meta: CheckpointMeta, first: int, blocks: torch.Tensor, deadline: float) -> None:
        """Store blocks ``first ..`` (``[n, *meta.block_shape]``), then ``meta``."""

    @abstractmethod
    def head(self, rid: str, deadline: float) -> CheckpointMeta | None:
        """The metadata of ``rid``'s checkpoint, or None."""

    @abstractmethod
    def get(self, rid: str, deadline: float) -> tuple[CheckpointMeta, torch.Tensor] | None:
        """Metadata and blocks ``[k, *block_shape]`` (``k <= meta.num_blocks``: the blocks present)."""

    @abstractmethod
    def delete(self, rid: str, deadline: float) -> None:
        """Forget ``rid`` (no-op if absent)."""

    @abstractmethod
    def rids(self, deadline: float) -> list[str]:
        """Request ids held."""


def check_put(old: CheckpointMeta | None, have: int, meta: CheckpointMeta, first: int,
              blocks: torch.Tensor, epoch: int = 0, members: frozenset[int] | None = None) -> None:
    """The rules every store applies to a save (``have``: blocks it holds for ``meta.rid``)."""
    if members is not None and meta.owner not in members:
        raise StoreError(f"save of {meta.rid} from rank {meta.owner}, which is not a member "
                         f"of epoch {epoch} ({sorted(members)})")
    if tuple(blocks.shape[1:]) != tuple(meta.block_shape):
        raise StoreError(f"blocks {tuple(blocks.shape)} do not match block_shape {meta.block_shape}")
    if first + blocks.shape[0] != meta.num_blocks:
        raise StoreError(f"blocks {first}..{first + blocks.shape[0] - 1} do not end at the last "
                         f"block ({meta.num_blocks - 1}) of {meta.num_tokens} tokens")
    if old is not None and first > 0:
        if meta.epoch < old.epoch:
            raise StoreError(f"save of {meta.rid} at epoch {meta.epoch} is older than the held "
                             f"one (epoch {old.epoch})")
        if first > have or old.block_shape != meta.block_shape:
            raise StoreError(f"incremental save of {meta.rid} from block {first} but the store "
                             f"holds {have} blocks")
    elif old is None and first > 0:
        raise StoreError(f"incremental save of {meta.rid} from block {first} but the store holds none")


class MemoryStore(CheckpointStore):
    """Blocks in this process's memory; thread-safe. The peer store's server side."""

    def __init__(self, location: str = "memory:0"):
        self.location = location
        self._lock = threading.Lock()
        self._meta: dict[str, CheckpointMeta] = {}
        self._blocks: dict[str, list[torch.Tensor]] = {}

    def put(self, meta, first, blocks, deadline, *, copy: bool = True):
        """``copy=False``: keep views of ``blocks`` (the caller hands over a private buffer,
        e.g. a received message)."""
        with self._lock:
            old = self._meta.get(meta.rid)
            held = self._blocks.get(meta.rid, [])
            check_put(old, len(held), meta, first, blocks, self.epoch, self.members)
            new = held[:first] + [b.clone() if copy else b for b in blocks.unbind(0)]
            self._blocks[meta.rid] = new
            self._meta[meta.rid] = meta

    def head(self, rid, deadline):
        with self._lock:
            return self._meta.get(rid)

    def get(self, rid, deadline):
        with self._lock:
            meta = self._meta.get(rid)
            if meta is None:
                return None
            blocks = self._blocks[rid][: meta.num_blocks]
        if not blocks:
            return meta, torch.empty((0, *meta.block_shape), dtype=_dtype(meta.dtype))
        return meta, torch.stack(blocks)

    def delete(self, rid, deadline):
        with self._lock:
            self._meta.pop(rid, None)
            self._blocks.pop(rid, None)

    def rids(self, deadline):
        with self._lock:
            return sorted(self._meta)

    def nbytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for bs in self._blocks.values() for b in bs)
