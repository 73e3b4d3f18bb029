"""Message format: ``[header, *tensor frames]``.

The header is a pickled dict (trusted local peers only: every socket is loopback or ipc) with
``"t"`` (message type), ``"epoch"`` and the tensor specs ``"tensors": [(dtype, shape), ...]``;
each tensor travels as its own frame, sent and received without copies (``copy=False`` on
send, ``torch.frombuffer`` on receive).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch

__all__ = ["encode", "decode"]

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.bool, torch.uint8, torch.float64)}


def encode(header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> list:
    specs, frames = [], []
    for t in tensors:
        t = t.detach().contiguous().cpu()
        specs.append((str(t.dtype), tuple(t.shape)))
        frames.append(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    header = dict(header, tensors=specs)
    return [pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL), *frames]


def decode(frames: list) -> tuple[dict[str, Any], list[torch.Tensor]]:
    header = pickle.loads(_bytes(frames[0]))
    out = []
    for (dtype, shape), frame in zip(header.pop("tensors", ()), frames[1:]):
        dt = _DTYPES[dtype]
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        if int(np.prod(shape)) == 0:
            out.append(torch.empty(shape, dtype=dt))
            continue
        t = torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=torch.uint8)
        out.append(t.view(dt).view(shape))
    return header, out


def _bytes(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
