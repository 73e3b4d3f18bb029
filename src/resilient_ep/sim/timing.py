"""Per-step time model of one decode step of the EP instance.

All ranks advance in lock step: one decode step is, for every layer, attention on each rank's
own sequences, then (MoE layers) dispatch -> expert GEMMs -> combine. The slowest rank sets the
pace, so the step time takes the largest per-rank batch and the most loaded expert rank::

    step = moe_layers   * (fixed + attn(b_max) + experts(T * k / n * imbalance) + a2a(b_max, n))
         + dense_layers * (fixed + attn(b_max))
         + overhead

    attn(b)        = attention_us_per_token * b
    experts(x)     = expert_us_per_token * x          x: (token, expert) pairs on the busiest rank
    a2a(b, n)      = dispatch_latency + combine_latency
                     + b * k * hidden * bytes_per_elem over NVLink (inside the node) and RDMA
                       (to other nodes), whichever takes longer, for dispatch and for combine

``b_max`` is the largest batch of a live rank, ``T`` the tokens of all live ranks, ``n`` the live
ranks and ``imbalance`` the most loaded rank's expert load over the mean. The defaults give
~60 ms per step for DeepSeek-V3 at 128 sequences per rank and EP 32, in line with published
wide-EP decode figures (TPOT ~50-60 ms) and DeepEP's low-latency kernel timings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from resilient_ep.sim.scenario import Scenario

__all__ = ["step_time_s", "Capacity", "nominal_capacity", "expert_load"]


def step_time_s(sc: Scenario, *, batch_max: float, total_tokens: float, live_ranks: int,
                imbalance: float) -> float:
    """Seconds of one decode step; see the module docstring for the formula."""
    if live_ranks <= 0:
        raise ValueError(f"live_ranks must be > 0, got {live_ranks}")
    t, m, hw = sc.timing, sc.model, sc.hardware
    us = 1e-6
    fixed = t.layer_fixed_us * us
    attn = t.attention_us_per_token * batch_max * us
    pairs = total_tokens * m.experts_per_token / live_ranks * imbalance
    experts = t.expert_us_per_token * pairs * us
    # Share of a rank's dispatched copies that leave its node.
    local_peers = min(sc.ranks_per_node, live_ranks) - 1
    remote = (live_ranks - 1 - local_peers) / (live_ranks - 1) if live_ranks > 1 else 0.0
    copies = batch_max * m.experts_per_token * m.hidden_size

    def a2a(bytes_per_elem: float, latency_us: float) -> float:
        b = copies * bytes_per_elem
        over_rdma = remote * b / (hw.rdma_gbps * 1e9)
        over_nvlink = (1.0 - remote) * b / (hw.nvlink_gbps * 1e9)
        return latency_us * us + max(over_rdma, over_nvlink)

    comm = a2a(t.dispatch_bytes_per_elem, t.dispatch_latency_us) + a2a(
        t.combine_bytes_per_elem, t.combine_latency_us)
    moe = m.moe_layers * (fixed + attn + experts + comm)
    dense = (m.total_layers - m.moe_layers) * (fixed + attn)
    return moe + dense + t.step_overhead_ms * 1e-3


@dataclass(frozen=True)
class Capacity:
    """What the full instance sustains at ``workload.max_batch_per_rank``."""

    step_s: float
    """One decode step at full batch."""

    tokens_per_s: float
    """Output tokens per second, prefill time included."""

    requests_per_s: float
    """Requests per second, prefill time included."""


def nominal_capacity(sc: Scenario) -> Capacity:
    """Capacity of the instance with every rank live and the pre-fault load imbalance."""
    w = sc.workload
    b = w.max_batch_per_rank
    step = step_time_s(sc, batch_max=b, total_tokens=b * sc.ranks, live_ranks=sc.ranks,
                       imbalance=sc.timing.load_imbalance)
    # Per rank, one request costs its prefill plus its share of decode steps.
    per_request_s = w.prompt_tokens * sc.timing.prefill_us_per_token * 1e-6 \
        + w.output_tokens * step / b
    req = sc.ranks / per_request_s
    return Capacity(step_s=step, tokens_per_s=req * w.output_tokens, requests_per_s=req)


def expert_load(sc: Scenario, num_layers: int, rng) -> np.ndarray:
    """``float64[L, E]`` expected tokens per expert: Zipf popularity with exponent
    ``timing.expert_skew``, a fresh random order of experts in every layer."""
    import numpy as np

    E = sc.model.num_experts
    w = 1.0 / np.arange(1, E + 1) ** sc.timing.expert_skew
    w = w / w.sum()
    return np.stack([rng.permutation(w) for _ in range(num_layers)])
