"""A digest of a worker's dense (non-expert) weights: what a replacement rank compares with a
survivor's before it joins (``rejoin.py``).

blake2b over every parameter but the routed experts' (names and bytes, in name order). The
weights a rank serves with do not change, so each worker computes it once, in a background
thread right after its weights are loaded (:func:`start`): a survivor asked for it at a rejoin
answers from the cache, between two steps, instead of hashing gigabytes there.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

__all__ = ["start", "digest"]

_lock = threading.Lock()
_cached: dict[str, Any] = {}


def digest(model: Any, routed=frozenset()) -> dict[str, Any]:
    """``{"dense_digest", "dense_params"}`` of ``model`` (computed once per process);
    ``routed``: the ``id()`` of each routed-expert parameter, left out."""
    import torch

    with _lock:
        if _cached:
            return dict(_cached)
        h = hashlib.blake2b(digest_size=16)
        count = 0
        for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
            if id(p) in routed:
                continue
            h.update(name.encode())
            h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            count += 1
        _cached.update({"dense_digest": h.hexdigest(), "dense_params": count})
        return dict(_cached)


def start(model: Any, routed=frozenset()) -> None:
    """Compute the digest in the background (after the weights are loaded)."""
    threading.Thread(target=digest, args=(model, routed), daemon=True,
                     name="resilient-ep-digest").start()
