"""How the checkpointer sees a paged KV cache: whole blocks in, whole blocks out.

- :class:`PagedView`: one tensor ``kv [L, 2, NB, BS, KVH, D]`` (the reference runtime's
  ``PagedKVCache.kv``); a block is ``[L, 2, BS, KVH, D]``.
- :class:`LayerListView`: one tensor per layer with blocks on dim 0, ``[NB, *rest]`` (what vLLM
  hands a KV connector: e.g. ``[NB, KVH, BS, 2*D]`` on its CPU backend); a block is
  ``[L, *rest]``, its bytes opaque to the checkpointer.

Both give ``block_shape``, ``dtype``, ``device``, ``read(ids [n]) -> [n, *block_shape]`` (a copy,
block-major) and ``write(ids [n], blocks [n, *block_shape])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import from_block_major, to_block_major

__all__ = ["PagedView", "LayerListView", "as_view"]


class PagedView:
    def __init__(self, kv: torch.Tensor, block_size: int):
        if kv.dim() != 6 or kv.shape[1] != 2 or kv.shape[3] != block_size:
            raise ValueError(f"kv {tuple(kv.shape)} must be [L, 2, NB, {block_size}, KVH, D]")
        self.kv = kv
        self.block_size = block_size
        self.block_shape = (kv.shape[0], 2, kv.shape[3], kv.shape[4], kv.shape[5])
        self.dtype = kv.dtype
        self.device = kv.device

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        return to_block_major(self.kv.index_select(2, ids))

    def write(self, ids: torch.Tensor, blocks: torch.Tensor) -> None:
        self.kv.index_copy_(2, ids.to(self.device), from_block_major(blocks).to(self.device, self.dtype))


class LayerListView:
    def __init__(self, layers: Sequence[torch.Tensor], block_size: int):
        layers = list(layers)
        if not layers or any(t.shape != layers[0].shape or t.dtype != layers[0].dtype for t in layers):
            raise ValueError("layers must be non-empty tensors of one shape and dtype")
        self.layers = layers
        self.block_size = block_size
        self.block_shape = (len(layers), *layers[0].shape[1:])
        self.dtype = layers[0].dtype
        self.device = layers[0].device

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.index_select(0, ids) for t in self.layers], dim=1)  # [n, L, *rest]

    def write(self, ids: torch.Tensor, blocks: torch.Tensor) -> None:
        ids = ids.to(self.device)
        for i, t in enumerate(self.layers):
            t.index_copy_(0, ids, blocks[:, i].to(self.device, self.dtype))


def as_view(cache):
    """A view of ``cache``: a view already, or anything with ``kv`` and ``block_size``."""
    if hasattr(cache, "read") and hasattr(cache, "block_shape"):
        return cache
    return PagedView(cache.kv, cache.block_size)
