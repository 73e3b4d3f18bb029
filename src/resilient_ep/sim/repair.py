"""Repair times by source, from bandwidths and sizes.

Sources, cheapest first (``RepairSource`` in ``scenario.py``):

==========  ============================================  ==============================
source      what moves                                    bandwidth per destination GPU
==========  ============================================  ==============================
shadow      nothing: a copy already in a live GPU          ``shadow_activate_s`` flat
peer        GPU -> GPU inside the node (NVLink)           ``nvlink_gbps``
host        host-memory backup -> GPU (PCIe)              ``pcie_gbps``
remote      another node's memory -> GPU (RDMA)           ``rdma_gbps``
disk        node storage -> GPU                           ``disk_gbps_per_node`` / loaders
==========  ============================================  ==============================

Destinations copy in parallel; only storage is shared by the ranks of one node that load at
the same time. Every transfer but ``shadow`` pays ``transfer_setup_s`` once.
"""

from __future__ import annotations

import math

from resilient_ep.sim.scenario import Scenario

__all__ = ["transfer_s", "rank_weights_s", "experts_repair_s"]


def transfer_s(sc: Scenario, source: str, bytes_per_dest: float, *,
               loaders_per_node: int = 1) -> float:
    """Seconds to move ``bytes_per_dest`` to each destination GPU from ``source``."""
    hw = sc.hardware
    if bytes_per_dest <= 0:
        return 0.0
    if source == "shadow":
        return hw.shadow_activate_s
    if source == "peer":
        gbps = hw.nvlink_gbps
    elif source == "host":
        gbps = hw.pcie_gbps
    elif source == "remote":
        gbps = hw.rdma_gbps
    elif source == "disk":
        gbps = hw.disk_gbps_per_node / max(1, loaders_per_node)
    else:
        raise ValueError(f"unknown repair source {source!r}")
    return hw.transfer_setup_s + bytes_per_dest / (gbps * 1e9)


def rank_weights_s(sc: Scenario, source: str, *, loaders_per_node: int = 1) -> float:
    """Seconds for one (re)started rank to load its dense weights and expert slots.

    ``shadow`` is meaningless for a whole rank and is treated as ``peer``."""
    src = "peer" if source == "shadow" else source
    return transfer_s(sc, src, sc.rank_weight_bytes, loaders_per_node=loaders_per_node)


def experts_repair_s(sc: Scenario, source: str, experts: int, dest_ranks: int) -> float:
    """Seconds to restore ``experts`` (layer, expert) weights spread over ``dest_ranks`` live
    ranks, all copying at once."""
    if experts <= 0:
        return 0.0
    dests = max(1, min(dest_ranks, experts))
    per_dest = math.ceil(experts / dests) * sc.model.expert_mb * 1e6
    loaders = min(dests, sc.ranks_per_node)
    return transfer_s(sc, source, per_dest, loaders_per_node=loaders)
