"""Recovery policies compared by the simulator, one small module each.

==================  =========================================================================
``full_restart``    fixed membership: every rank restarts, reloads weights, in-flight
                    requests are re-prefilled
``mask_and_repair`` EEP: shrink membership, repair expert coverage, pause to reintegrate
``shadow_kv``       Tarragon: shadow experts, KV checkpoints with per-request restore
``resilient_ep``    this project: the core's fault-aware placement and replan, tiered repair,
                    KV checkpoints, reintegration by one table flip
==================  =========================================================================
"""

from __future__ import annotations

from resilient_ep.sim.policies.full_restart import FullRestart
from resilient_ep.sim.policies.mask_and_repair import MaskAndRepair
from resilient_ep.sim.policies.resilient_ep import ResilientEP
from resilient_ep.sim.policies.shadow_kv import ShadowKV

POLICIES = {
    "full_restart": FullRestart,
    "mask_and_repair": MaskAndRepair,
    "shadow_kv": ShadowKV,
    "resilient_ep": ResilientEP,
}

__all__ = ["POLICIES", "FullRestart", "MaskAndRepair", "ShadowKV", "ResilientEP"]
