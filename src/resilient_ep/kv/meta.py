"""What a KV checkpoint is: per-request metadata, the block-major layout of its data, checksums.

Glossary
--------
- **checkpoint** of a request: the K/V of its positions ``0 .. num_tokens-1`` (every layer),
  as whole blocks, plus :class:`CheckpointMeta`. It is built incrementally: each save copies
  only the blocks changed since the last one (the last, partly filled block and new ones).
- **block index**: a block's place in the request (position ``p`` is in block ``p // BS``),
  the same on every rank; a **block id** is where that block sits in one rank's paged cache.
- **location**: where a replica lives, a string ``"<store>:<n>"``: ``peer:2`` (host memory of
  rank 2), ``shm:0`` (local shared memory), ``file:1`` (files).

Tensors (L layers, BS block size, KVH kv heads, D head dim, n blocks)
---------------------------------------------------------------------
- a paged cache holds ``[L, 2, NB, BS, KVH, D]`` (see ``runtime.kv_cache``);
- a checkpoint's data is **block-major** ``[n, L, 2, BS, KVH, D]``: each block is one
  contiguous byte range, so it has its own checksum and can be written at its own offset.
  ``to_block_major(cache_kv.index_select(2, ids))`` and ``from_block_major`` convert.

Example: BS=16, a request with 40 cached tokens has blocks 0, 1 (full) and 2 (8 tokens). Its
next save at 56 tokens copies blocks 2 and 3 only.
"""

from __future__ import annotations

import array
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["CheckpointMeta", "block_crcs", "token_crc", "to_block_major", "from_block_major",
           "verified_blocks"]


@dataclass(frozen=True)
class CheckpointMeta:
    """Per-request metadata stored beside the blocks (small; travels as a dict)."""

    rid: str
    num_tokens: int
    """Tokens covered: the checkpoint holds K/V of positions ``0 .. num_tokens-1``."""
    block_size: int
    epoch: int
    """Membership epoch of the save (a store refuses a save older than what it holds)."""
    owner: int
    """Rank that saved it."""
    block_ids: tuple[int, ...]
    """Block ids in the owner's paged cache (informational: a restore allocates its own)."""
    checksums: tuple[int, ...]
    """crc32 of each block's bytes, block-major, one per block (``num_blocks`` of them)."""
    token_crc: int
    """crc32 of ``tokens[:num_tokens]`` as int64: a restore checks it is the same sequence."""
    block_shape: tuple[int, ...]
    """One block: ``(L, 2, BS, KVH, D)`` in the reference runtime; opaque per-layer block bytes
    ``(L, *rest)`` for an engine's own cache layout (see ``cache_views``)."""
    dtype: str

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens ({self.num_tokens}) must be >= 0")
        if len(self.checksums) != self.num_blocks:
            raise ValueError(f"{self.num_tokens} tokens in blocks of {self.block_size} need "
                             f"{self.num_blocks} checksums, got {len(self.checksums)}")
        if not self.block_shape or any(int(x) <= 0 for x in self.block_shape):
            raise ValueError(f"block_shape {self.block_shape} must be positive sizes")

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    @property
    def block_bytes(self) -> int:
        n = 1
        for s in self.block_shape:
            n *= s
        return n * torch.empty((), dtype=_dtype(self.dtype)).element_size()

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it deep-copies every tuple (milliseconds for long requests).
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CheckpointMeta":
        d = dict(d)
        for k in ("block_ids", "checksums", "block_shape"):
            d[k] = tuple(d[k])
        return cls(**d)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def to_block_major(kv: torch.Tensor) -> torch.Tensor:
    """``[L, 2, n, BS, KVH, D]`` → contiguous ``[n, L, 2, BS, KVH, D]`` (a copy)."""
    return kv.permute(2, 0, 1, 3, 4, 5).contiguous()


def from_block_major(blocks: torch.Tensor) -> torch.Tensor:
    """``[n, L, 2, BS, KVH, D]`` → ``[L, 2, n, BS, KVH, D]`` (a view)."""
    return blocks.permute(1, 2, 0, 3, 4, 5)


def block_crcs(blocks: torch.Tensor) -> list[int]:
    """crc32 of each block of a contiguous CPU block-major tensor ``[n, ...]``."""
    raw = blocks.contiguous().view(torch.uint8).reshape(blocks.shape[0], -1).numpy()
    return [zlib.crc32(raw[i]) for i in range(raw.shape[0])]


def token_crc(tokens: Sequence[int], start_crc: int = 0) -> int:
    """crc32 of token ids as int64; chainable: ``token_crc(b, token_crc(a)) == token_crc(a + b)``."""
    return zlib.crc32(array.array("q", tokens).tobytes(), start_crc)


def verified_blocks(meta: CheckpointMeta, blocks: torch.Tensor) -> int:
    """How many leading blocks of ``blocks [k, ...]`` match their checksum (stops at the first bad one)."""
    if tuple(blocks.shape[1:]) != tuple(meta.block_shape):
        return 0
    got = block_crcs(blocks[: meta.num_blocks])
    for i, (a, b) in enumerate(zip(got, meta.checksums)):
        if a != b:
            return i
    return len(got)
