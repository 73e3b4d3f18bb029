"""Attention of one step over the paged KV cache: the continuous batch's layout
(:class:`AttentionBatch`) and the two attention kernels that read it (``batched`` and
``per_row``, see :class:`~resilient_ep.runtime.model.MoEModel`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kv_cache import PagedKVCache

__all__ = ["AttentionBatch", "attend_batched", "attend_per_row"]


@dataclass
class AttentionBatch:
    """A continuous batch: per request, its block table, tokens cached before and new in this step.

    Prefill chunks and decode tokens mix freely: a decode request has ``num_new == 1``; a
    prefill chunk has ``num_new > 1`` and ``num_cached`` = tokens of earlier chunks.
    The new tokens of the step are laid out request by request, in list order. Build one per
    step; every layer reuses its index tensors.

    Example (block_size 4): ``block_tables=[[0, 1], [2]]``, ``num_cached=[5, 0]``,
    ``num_new=[1, 3]`` → T=4, ``positions=[5, 0, 1, 2]``, ``slots=[5, 8, 9, 10]``,
    ``query_start=[0, 1, 4]``, ``last_token_index=[0, 3]``.

    Derived (``__post_init__``):
    - ``positions``        ``[T]`` int64  position of each new token in its request
    - ``slots``            ``[T]`` int64  flat KV slot ``block * block_size + offset``
    - ``query_start``      ``B+1`` ints   request r owns tokens ``query_start[r]:query_start[r+1]``
    - ``last_token_index`` ``[B]`` int64  index in T of each request's last new token
    - ``decode_requests``  Bd ints  the requests with ``num_new == 1``, in order
    - ``decode_token_index`` ``[Bd]`` int64  index in T of each decode request's token
    - ``decode_kv_slots``  ``[Bd, Nmax]`` int64  KV slots of positions ``0 .. cached`` of each
      decode request, right-padded; ``decode_kv_mask`` ``[Bd, Nmax]`` bool (True = real key)
    - ``prefill``          list of ``(r, kv_slots [cached+new])`` for requests with ``num_new > 1``
    """

    block_tables: list[list[int]]
    num_cached: list[int]
    num_new: list[int]
    block_size: int
    positions: torch.Tensor = field(init=False, repr=False)
    slots: torch.Tensor = field(init=False, repr=False)
    query_start: list[int] = field(init=False, repr=False)
    last_token_index: torch.Tensor = field(init=False, repr=False)
    decode_requests: list[int] = field(init=False, repr=False)
    decode_token_index: torch.Tensor = field(init=False, repr=False)
    decode_kv_slots: torch.Tensor = field(init=False, repr=False)
    decode_kv_mask: torch.Tensor = field(init=False, repr=False)
    prefill: list[tuple[int, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        b, bs = len(self.block_tables), self.block_size
        if len(self.num_cached) != b or len(self.num_new) != b:
            raise ValueError(
                f"block_tables ({b}), num_cached ({len(self.num_cached)}) and num_new "
                f"({len(self.num_new)}) must have one entry per request"
            )
        if bs <= 0:
            raise ValueError(f"block_size ({bs}) must be > 0")
        starts = [0]
        for r, (table, cached, new) in enumerate(zip(self.block_tables, self.num_cached, self.num_new)):
            if new <= 0 or cached < 0:
                raise ValueError(f"request {r}: num_new ({new}) must be > 0 and num_cached ({cached}) >= 0")
            need = (cached + new + bs - 1) // bs
            if len(table) < need:
                raise ValueError(
                    f"request {r}: {cached + new} tokens need {need} blocks of {bs}, "
                    f"block table has {len(table)}"
                )
            starts.append(starts[-1] + new)
        self.query_start = starts
        self.last_token_index = torch.as_tensor(starts[1:], dtype=torch.long) - 1
        width = max((len(t) for t in self.block_tables), default=1) or 1
        tables = torch.zeros(b, width, dtype=torch.long)  # [B, maxblocks], padded with block 0
        for r, t in enumerate(self.block_tables):
            tables[r, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        cached_t = torch.as_tensor(self.num_cached, dtype=torch.long)
        new_t = torch.as_tensor(self.num_new, dtype=torch.long)

        # New tokens of the step.
        req = torch.repeat_interleave(torch.arange(b), new_t)  # [T] request of each token
        start_t = torch.as_tensor(starts[:-1], dtype=torch.long)
        self.positions = cached_t[req] + torch.arange(starts[-1]) - start_t[req]  # [T]
        self.slots = tables[req, self.positions // bs] * bs + self.positions % bs  # [T]

        # Decode requests: one padded gather for all of them.
        dec = (new_t == 1).nonzero().squeeze(1)  # [Bd]
        self.decode_requests = dec.tolist()
        self.decode_token_index = start_t[dec]
        lens = cached_t[dec] + 1  # [Bd]
        nmax = int(lens.max()) if dec.numel() else 0
        pos = torch.arange(nmax)
        blk = tables[dec][:, (pos // bs).clamp(max=width - 1)]  # [Bd, Nmax]
        self.decode_kv_slots = blk * bs + pos % bs
        self.decode_kv_mask = pos[None, :] < lens[:, None]

        # Prefill chunks: one gather each.
        self.prefill = []
        for r in (new_t > 1).nonzero().squeeze(1).tolist():
            p = torch.arange(self.num_cached[r] + self.num_new[r])
            self.prefill.append((r, tables[r, p // bs] * bs + p % bs))

    @property
    def num_requests(self) -> int:
        return len(self.block_tables)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]


def attend_batched(
    layer: int, q: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache, out: torch.Tensor, scale: float
) -> None:
    """Decode requests in one padded call, each prefill chunk in one causal call; fills ``out``."""
    dev = kv.kv.device
    if batch.decode_token_index.numel():
        # q [Bd, NH, 1, D] against padded keys [Bd, KVH, Nmax, D].
        di = batch.decode_token_index.to(q.device)
        keys, vals = kv.gather_slots(layer, batch.decode_kv_slots.to(dev))  # [Bd, Nmax, KVH, D]
        mask = batch.decode_kv_mask.to(q.device)[:, None, None, :]  # [Bd, 1, 1, Nmax]
        o = F.scaled_dot_product_attention(
            q[di].unsqueeze(2),
            keys.to(q.dtype).transpose(1, 2),
            vals.to(q.dtype).transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )  # [Bd, NH, 1, D]
        out[di] = o.squeeze(2)
    for r, kv_slots in batch.prefill:
        a, b = batch.query_start[r], batch.query_start[r + 1]
        cached, new = batch.num_cached[r], b - a
        keys, vals = kv.gather_slots(layer, kv_slots.to(dev))  # [N, KVH, D]
        qr = q[a:b].transpose(0, 1).unsqueeze(0)  # [1, NH, n, D]
        kr = keys.to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, N, D]
        vr = vals.to(q.dtype).transpose(0, 1).unsqueeze(0)
        if cached == 0:
            mask, causal = None, True
        else:  # query i sits at position cached + i and sees keys 0 .. cached + i
            qi = torch.arange(new, device=q.device)[:, None]
            kj = torch.arange(cached + new, device=q.device)[None, :]
            mask, causal = kj <= qi + cached, False
        o = F.scaled_dot_product_attention(
            qr, kr, vr, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )  # [1, NH, n, D]
        out[a:b] = o[0].transpose(0, 1)


def attend_per_row(
    layer: int, q: torch.Tensor, batch: AttentionBatch, kv: PagedKVCache, out: torch.Tensor, scale: float
) -> None:
    """Each new token in its own call over keys ``0 .. its position`` (batch-invariant); fills ``out``."""
    dev = kv.kv.device
    per_request = dict(batch.prefill)
    for j, r in enumerate(batch.decode_requests):
        per_request[r] = batch.decode_kv_slots[j, : batch.num_cached[r] + 1]
    for r in range(batch.num_requests):
        a, b = batch.query_start[r], batch.query_start[r + 1]
        keys, vals = kv.gather_slots(layer, per_request[r].to(dev))  # [N, KVH, D]
        keys = keys.to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, N, D]
        vals = vals.to(q.dtype).transpose(0, 1).unsqueeze(0)
        for i in range(b - a):
            n = batch.num_cached[r] + i + 1
            o = F.scaled_dot_product_attention(
                q[a + i][None, :, None, :], keys[:, :, :n], vals[:, :, :n], scale=scale, enable_gqa=True
            )  # [1, NH, 1, D]
            out[a + i] = o[0, :, 0]
