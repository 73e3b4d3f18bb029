"""Paged KV cache of the reference runtime: one preallocated tensor plus a block allocator.

Glossary
--------
- **block**: ``block_size`` consecutive token positions of one request, for every layer, K and V.
  Blocks are the unit of allocation, of checkpointing and of restore (whole blocks are copied).
- **block table**: the list of block ids of one request, in position order; position ``p`` of the
  request lives in block ``block_table[p // block_size]`` at offset ``p % block_size``.
- **slot**: a flat index ``block_id * block_size + offset`` into the cache's token dimension;
  a ``slot_mapping [T]`` says where each of the T new tokens of a step is written.

Tensors (L layers, NB blocks, BS block size, KVH kv heads, D head dim)
----------------------------------------------------------------------
- ``PagedKVCache.kv``  ``[L, 2, NB, BS, KVH, D]``  index 0 of dim 1 is K, 1 is V. Allocated once;
  its storage never moves (``write_blocks`` copies into it).
- ``write(layer, slot_mapping [T], k [T, KVH, D], v [T, KVH, D])``
- ``gather(layer, block_table, num_tokens) -> (k [N, KVH, D], v [N, KVH, D])``  N = num_tokens.
- ``gather_slots(layer, slots [*S]) -> (k [*S, KVH, D], v [*S, KVH, D])``  (e.g. S = [B, Nmax], padded).
- ``read_blocks(block_ids [n]) -> [L, 2, n, BS, KVH, D]``  (a copy) and
  ``write_blocks(block_ids [n], blocks [L, 2, n, BS, KVH, D])``.

Example: ``block_size=4``, a request with table ``[7, 2]`` and 6 tokens keeps positions 0-3 in
block 7 and positions 4-5 in slots 0-1 of block 2 (flat slots 8, 9).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

__all__ = ["OutOfBlocksError", "BlockAllocator", "PagedKVCache", "slot_mapping"]


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks-1``; lowest free ids first (deterministic)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) must be > 0")
        self.num_blocks = num_blocks
        # Kept sorted descending so that pop() gives the lowest free id.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; raises ``OutOfBlocksError`` (and takes none) if fewer are free."""
        if n < 0:
            raise ValueError(f"n ({n}) must be >= 0")
        if n > len(self._free):
            raise OutOfBlocksError(
                f"asked for {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free"
            )
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Return blocks to the pool; freeing a block that is not allocated is an error."""
        for b in block_ids:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (num_blocks={self.num_blocks})")
        for b in block_ids:
            self._used.remove(b)
        self._free.extend(block_ids)
        self._free.sort(reverse=True)


def slot_mapping(block_table: Sequence[int], start: int, count: int, block_size: int) -> torch.Tensor:
    """Flat slots ``[count]`` of positions ``start .. start+count-1`` of one request."""
    needed = (start + count + block_size - 1) // block_size
    if needed > len(block_table):
        raise ValueError(
            f"positions up to {start + count - 1} need {needed} blocks of {block_size} tokens, "
            f"block table has {len(block_table)}"
        )
    pos = torch.arange(start, start + count, dtype=torch.long)
    table = torch.as_tensor(list(block_table), dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


class PagedKVCache:
    """One preallocated K/V tensor for all layers, a block allocator and per-request tables.

    Requests are named by any hashable id. ``reserve(req, n)`` grows the request's block table
    so that it covers ``n`` tokens; ``free(req)`` returns its blocks. Runtimes that manage
    block tables themselves can use ``allocator`` directly and pass tables to ``write``/``gather``.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, val in (
            ("num_layers", num_layers),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if val <= 0:
                raise ValueError(f"{name} ({val}) must be > 0")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.allocator = BlockAllocator(num_blocks)
        self.kv = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )  # [L, 2, NB, BS, KVH, D]
        self._tables: dict[Hashable, list[int]] = {}

    # ---- per-request allocation -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def reserve(self, request_id: Hashable, num_tokens: int) -> list[int]:
        """Grow ``request_id``'s table to cover ``num_tokens`` tokens; returns the table (a copy)."""
        table = self._tables.setdefault(request_id, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > 0:
            try:
                table.extend(self.allocator.allocate(extra))
            except OutOfBlocksError as e:
                if not table:
                    del self._tables[request_id]
                raise OutOfBlocksError(
                    f"request {request_id!r} needs {extra} more KV blocks for {num_tokens} tokens: {e}"
                ) from None
        return list(table)

    def block_table(self, request_id: Hashable) -> list[int]:
        if request_id not in self._tables:
            raise KeyError(f"request {request_id!r} has no KV blocks")
        return list(self._tables[request_id])

    def free(self, request_id: Hashable) -> None:
        """Release all blocks of ``request_id`` (no-op if it holds none)."""
        table = self._tables.pop(request_id, None)
        if table:
            self.allocator.free(table)

    def adopt(self, request_id: Hashable, block_ids: Sequence[int]) -> None:
        """Record an externally allocated table (e.g. after restore) for ``request_id``."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already holds blocks {self._tables[request_id]}")
        self._tables[request_id] = list(block_ids)

    # ---- data movement ----------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ``[T, KVH, D]`` of ``layer`` at flat ``slots [T]``."""
        if k.shape != v.shape or k.shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"k {tuple(k.shape)} / v {tuple(v.shape)} must both be "
                f"[T, {self.num_kv_heads}, {self.head_dim}]"
            )
        if slots.shape != (k.shape[0],):
            raise ValueError(f"slots {tuple(slots.shape)} must be [{k.shape[0]}]")
        flat = self.kv[layer].view(2, self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        flat[0].index_copy_(0, slots, k.to(flat.dtype))
        flat[1].index_copy_(0, slots, v.to(flat.dtype))

    def gather(
        self, layer: int, block_table: Sequence[int] | torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[num_tokens, KVH, D]`` of positions ``0 .. num_tokens-1`` of one request."""
        nb = self.blocks_needed(num_tokens)
        table = torch.as_tensor(block_table, dtype=torch.long)[:nb]
        if table.numel() < nb:
            raise ValueError(f"{num_tokens} tokens need {nb} blocks, block table has {table.numel()}")
        kv = self.kv[layer][:, table]  # [2, nb, BS, KVH, D]
        kv = kv.reshape(2, nb * self.block_size, self.num_kv_heads, self.head_dim)[:, :num_tokens]
        return kv[0], kv[1]

    def gather_slots(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at flat ``slots`` of any shape ``[*S]`` → ``k, v [*S, KVH, D]`` (copies)."""
        flat = self.kv[layer].view(2, self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        idx = slots.reshape(-1)
        k = flat[0].index_select(0, idx).view(*slots.shape, self.num_kv_heads, self.head_dim)
        v = flat[1].index_select(0, idx).view(*slots.shape, self.num_kv_heads, self.head_dim)
        return k, v

    def read_blocks(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Copy of whole blocks, all layers: ``[L, 2, n, BS, KVH, D]``."""
        ids = self._check_ids(block_ids)
        return self.kv.index_select(2, ids)

    def write_blocks(self, block_ids: Sequence[int] | torch.Tensor, blocks: torch.Tensor) -> None:
        """Overwrite whole blocks, all layers, from ``blocks [L, 2, n, BS, KVH, D]``."""
        ids = self._check_ids(block_ids)
        want = (self.num_layers, 2, ids.numel(), self.block_size, self.num_kv_heads, self.head_dim)
        if tuple(blocks.shape) != want:
            raise ValueError(f"blocks {tuple(blocks.shape)} must be {want}")
        self.kv.index_copy_(2, ids, blocks.to(self.kv.dtype))

    def _check_ids(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(block_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise ValueError(f"block ids {ids.tolist()} out of range [0, {self.num_blocks})")
        return ids.to(self.kv.device)
