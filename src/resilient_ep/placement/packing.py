"""Packing replicas into ranks' slots: load-only (the baseline) and fault-aware.

Both work on all layers at once: each layer's replicas are sorted heaviest first (LPT) and the
j-th replica of every layer is placed in the same vectorised step, choosing a rank by a cost
over ``[L, R]``.

Fault-aware packing (ours) keeps the load-only packing's max rank load within a tolerance and,
inside that budget, minimises the *exposure sets*: the rank sets whose joint failure loses an
expert. An expert with replicas on ranks A is lost exactly when every rank of A fails, so
  - replicas of one expert go to distinct ranks (hard) and distinct nodes (where possible);
  - a two-replica expert goes to a fixed *mirror pair* (rank r and its partner on another node),
    so all two-replica experts share few pairs instead of scattering over many;
The structure is shared across layers, so L layers expose hardly more than one.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import ExpertLayout

__all__ = ["pack_by_load", "pack_fault_aware", "mirror_partner"]

_INF = 1e18


def _item_order(load: np.ndarray, counts: np.ndarray):
    """Per layer, replica items sorted heaviest first, an expert's replicas consecutive.

    Returns (expert [L, P], replica_index [L, P], weight [L, P], count [L, P])."""
    L, E = load.shape
    per_replica = load / counts
    # Sort experts by per-replica load desc, then by count desc (stable, deterministic).
    order = np.lexsort((np.broadcast_to(np.arange(E), (L, E)), -counts, -per_replica), axis=1)
    P = int(counts[0].sum())
    if not (counts.sum(axis=1) == P).all():
        raise ValueError("every layer must have the same number of replicas")
    expert = np.empty((L, P), dtype=np.int64)
    rep = np.empty((L, P), dtype=np.int64)
    for l in range(L):
        cs = counts[l, order[l]]
        expert[l] = np.repeat(order[l], cs)
        starts = np.repeat(np.cumsum(cs) - cs, cs)
        rep[l] = np.arange(P) - starts
    rows = np.arange(L)[:, None]
    weight = per_replica[rows, expert]
    count = counts[rows, expert]
    return expert, rep, weight, count


def _to_layout(expert: np.ndarray, rank: np.ndarray, num_ranks: int, slots_per_rank: int,
               num_experts: int, max_replicas: int | None) -> ExpertLayout:
    """Layout from item -> rank assignments (``expert``, ``rank``: [L, n]); within a rank,
    slots hold its experts in ascending id order."""
    L, n = expert.shape
    p2l = np.full((L, num_ranks * slots_per_rank), -1, dtype=np.int64)
    for l in range(L):
        order = np.lexsort((expert[l], rank[l]))
        r_sorted, e_sorted = rank[l, order], expert[l, order]
        first = np.searchsorted(r_sorted, r_sorted, side="left")
        p2l[l, r_sorted * slots_per_rank + (np.arange(n) - first)] = e_sorted
    return ExpertLayout.from_mapping(torch.from_numpy(p2l), num_ranks=num_ranks,
                                     num_experts=num_experts, max_replicas=max_replicas)


def pack_by_load(load: np.ndarray, counts: np.ndarray, num_ranks: int, slots_per_rank: int,
                 *, max_replicas: int | None = None) -> ExpertLayout:
    """Balanced packing by load alone (what vLLM's default EPLB policy does): each replica,
    heaviest first, goes to the least-loaded rank with a free slot. Replicas of one expert
    may share a rank."""
    L, E = load.shape
    expert, _rep, weight, _cnt = _item_order(load, counts)
    rank_load = np.zeros((L, num_ranks))
    free = np.full((L, num_ranks), slots_per_rank)
    chosen = np.empty_like(expert)
    rows = np.arange(L)
    for j in range(expert.shape[1]):
        cost = np.where(free > 0, rank_load, _INF)
        r = np.argmin(cost, axis=1)
        rank_load[rows, r] += weight[:, j]
        free[rows, r] -= 1
        chosen[:, j] = r
    return _to_layout(expert, chosen, num_ranks, slots_per_rank, E, max_replicas)


def mirror_partner(num_ranks: int, num_nodes: int) -> np.ndarray:
    """[R] the mirror-pair partner of each rank: the rank half the ring away, which sits on
    another node whenever the node count is even; -1 for an unpaired rank (odd R)."""
    half = num_ranks // 2
    partner = np.full(num_ranks, -1, dtype=np.int64)
    if half:
        partner[:half] = np.arange(half) + half
        partner[half:2 * half] = np.arange(half)
    return partner


def pack_fault_aware(load: np.ndarray, counts: np.ndarray, num_ranks: int, slots_per_rank: int,
                     *, num_nodes: int, mirror_pairs: bool | np.ndarray = True,
                     max_replicas: int | None = None) -> ExpertLayout:
    """Fault-aware packing (see module docstring). ``mirror_pairs`` (one flag, or one per
    layer) False keeps only the distinct-rank and distinct-node rules: a layer with a
    single-replica expert gains nothing from pairs (any rank failure can already lose that
    expert) and balances better without them.

    An expert with ``c`` replicas becomes ``c // 2`` *pair items* (one replica on each rank of
    a mirror pair, so both ranks get the same load) and ``c % 2`` *single items*. Items go
    heaviest first (LPT): a pair item to the pair with the lowest max load that has a free slot
    on both sides, a single item to the least-loaded rank with a free slot that does not hold
    the expert yet, on a node it is not on yet where possible.
    """
    L, E = load.shape
    R, S = num_ranks, slots_per_rank
    per_replica = load / counts
    node = np.arange(R) // max(R // num_nodes, 1)
    half = R // 2
    left = np.arange(half)               # pair q = (left[q], left[q] + half)
    right = left + half

    # Items per layer: (expert, is_pair, weight per replica), heaviest first, pairs first on ties.
    use_pairs = np.broadcast_to(np.asarray(mirror_pairs, dtype=bool), (L,))
    items_e, items_pair = [], []
    for l in range(L):
        c = counts[l]
        n_pair = c // 2 if (half and use_pairs[l]) else np.zeros_like(c)
        n_single = c - 2 * n_pair
        e_pair = np.repeat(np.arange(E), n_pair)
        e_single = np.repeat(np.arange(E), n_single)
        e = np.concatenate([e_pair, e_single])
        is_pair = np.concatenate([np.ones(len(e_pair), bool), np.zeros(len(e_single), bool)])
        order = np.lexsort((~is_pair, e, -per_replica[l, e]))
        items_e.append(e[order])
        items_pair.append(is_pair[order])
    n_items = max(len(x) for x in items_e)
    expert = np.full((L, n_items), -1, dtype=np.int64)
    pair = np.zeros((L, n_items), dtype=bool)
    for l in range(L):
        expert[l, :len(items_e[l])] = items_e[l]
        pair[l, :len(items_pair[l])] = items_pair[l]
    rows = np.arange(L)
    weight = np.where(expert >= 0, per_replica[rows[:, None], np.maximum(expert, 0)], 0.0)

    rank_load = np.zeros((L, R))
    free = np.full((L, R), S)
    holds = np.zeros((L, R), dtype=bool)        # ranks holding the current item's expert
    node_used = np.zeros((L, num_nodes), dtype=bool)
    prev = np.full(L, -2, dtype=np.int64)
    out_e: list[np.ndarray] = []
    out_r: list[np.ndarray] = []

    def put(ls: np.ndarray, rs: np.ndarray, es: np.ndarray, ws: np.ndarray) -> None:
        rank_load[ls, rs] += ws
        free[ls, rs] -= 1
        holds[ls, rs] = True
        node_used[ls, node[rs]] = True
        out_e.append(es)
        out_r.append(rs)
        out_l.append(ls)

    out_l: list[np.ndarray] = []
    for j in range(n_items):
        e = expert[:, j]
        active = e >= 0
        new = e != prev
        holds[new] = False
        node_used[new] = False
        prev = e
        w = weight[:, j]

        single_rows = rows[active & ~pair[:, j]]
        pair_rows = rows[active & pair[:, j]]
        if pair_rows.size:
            fl, fr = free[pair_rows][:, left], free[pair_rows][:, right]
            hl, hr = holds[pair_rows][:, left], holds[pair_rows][:, right]
            cost = np.maximum(rank_load[pair_rows][:, left], rank_load[pair_rows][:, right])
            cost = cost + (hl | hr) * 1e12
            cost[(fl <= 0) | (fr <= 0)] = _INF
            q = np.argmin(cost, axis=1)
            ok = cost[np.arange(len(q)), q] < _INF
            pl = pair_rows[ok]
            put(pl, left[q[ok]], e[pl], w[pl])
            put(pl, right[q[ok]], e[pl], w[pl])
            # No pair has room on both sides: place the two replicas as single items.
            stuck = pair_rows[~ok]
            single_rows = np.concatenate([single_rows, stuck, stuck])
        for group in _unique_passes(single_rows):
            cost = rank_load[group] + holds[group] * 1e12 + node_used[group][:, node] * 1e6
            cost[free[group] <= 0] = _INF
            r = np.argmin(cost, axis=1)
            put(group, r, e[group], w[group])
    ls, rs, es = np.concatenate(out_l), np.concatenate(out_r), np.concatenate(out_e)
    # Back to per-layer rows of (expert, rank).
    order = np.argsort(ls, kind="stable")
    per_layer = np.bincount(ls, minlength=L)
    if not (per_layer == per_layer[0]).all():
        raise AssertionError("every layer must place the same number of replicas")
    return _to_layout(es[order].reshape(L, -1), rs[order].reshape(L, -1), R, S, E, max_replicas)


def _unique_passes(rows: np.ndarray):
    """Split row ids into passes with no repeated row (a stuck pair item places twice)."""
    rows = np.sort(rows)
    while rows.size:
        first = np.ones(rows.size, dtype=bool)
        first[1:] = rows[1:] != rows[:-1]
        yield rows[first]
        rows = rows[~first]
