"""Per-rank continuous batching: which requests run, and the batch of one step.

A request arriving on a rank (new, or migrated from a dead rank with the tokens it had
generated) is prefilled over all its known tokens in its first step; afterwards it decodes one
token per step. Finished requests free their KV blocks at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import PagedKVCache
from .model import AttentionBatch

__all__ = ["RankRequest", "RankScheduler", "StepPlan"]


@dataclass
class RankRequest:
    rid: str
    tokens: list[int]
    """Prompt plus every token generated so far (for a migrated request, on earlier ranks too)."""
    max_new: int
    """Tokens still to generate on this rank."""
    eos: int | None = None
    num_cached: int = 0
    """Tokens whose K/V are in this rank's cache."""
    produced: int = 0
    degraded: bool = False


@dataclass
class StepPlan:
    requests: list[RankRequest]
    token_ids: torch.Tensor       # [T]
    batch: AttentionBatch
    num_new: list[int] = field(default_factory=list)


class RankScheduler:
    def __init__(self, kv: PagedKVCache, *, max_batch_tokens: int = 2048, on_drop=None):
        self.kv = kv
        self.max_batch_tokens = max_batch_tokens
        self.running: dict[str, RankRequest] = {}
        self.on_drop = on_drop
        """Called with a request id before its KV blocks are freed (e.g. to stop checkpointing it)."""

    def add(self, req: RankRequest) -> None:
        if req.rid in self.running:
            raise ValueError(f"request {req.rid!r} is already running on this rank")
        self.running[req.rid] = req

    def drop(self, rid: str) -> None:
        if self.running.pop(rid, None) is not None:
            if self.on_drop is not None:
                self.on_drop(rid)
            self.kv.free(rid)

    def plan(self) -> StepPlan | None:
        reqs, ids, tables, cached, new = [], [], [], [], []
        budget = self.max_batch_tokens
        for req in self.running.values():
            n = len(req.tokens) - req.num_cached
            if n <= 0:
                continue
            if n > budget and reqs:
                break
            table = self.kv.reserve(req.rid, len(req.tokens))
            reqs.append(req)
            ids.extend(req.tokens[req.num_cached:])
            tables.append(table)
            cached.append(req.num_cached)
            new.append(n)
            budget -= n
        if not reqs:
            return None
        batch = AttentionBatch(tables, cached, new, self.kv.block_size)
        return StepPlan(reqs, torch.tensor(ids, dtype=torch.int64), batch, new)

    def commit(self, plan: StepPlan, next_tokens: list[int]) -> list[tuple[str, int, bool]]:
        """Record each request's new token; returns ``(rid, token, finished)``."""
        out = []
        for req, n, tok in zip(plan.requests, plan.num_new, next_tokens):
            req.num_cached += n
            req.tokens.append(tok)
            req.produced += 1
            finished = req.produced >= req.max_new or (req.eos is not None and tok == req.eos)
            out.append((req.rid, tok, finished))
            if finished:
                self.drop(req.rid)
        return out
