"""The one message format of every socket of the project: ``[header, *tensor frames]``.

Frame 0 is ``MAGIC`` (``b"REP"``), one version byte (``VERSION``) and a msgpack map: the
message's fields (``"t"``, its type, ``"epoch"``, ...) and ``"tensors"``, one
``[dtype, shape]`` per tensor frame. Each tensor travels as its own frame, sent without a
copy (``copy=False``) and received without one (``torch.frombuffer``).

Nothing received is trusted. :func:`decode` checks, before anything is used, that
- frame 0 starts with the magic and a version this build reads;
- the header is a map of string keys no larger than ``MAX_HEADER`` bytes (msgpack is data
  only: no object is constructed from it, unlike pickle);
- every tensor spec names a known dtype and a shape of at most ``MAX_DIMS`` non-negative
  dimensions, there is exactly one frame per spec, and each frame's size is exactly the
  spec's.

Anything else raises :class:`WireError` with a ``reason`` (``magic``, ``version``,
``header``, ``tensors``, ``size``, ``auth``) that receive loops count by. Unknown header
fields are passed through and ignored by the receivers that do not know them, so a newer
sender with an extra field still talks to an older receiver of the same version.

Authentication. With an instance key (:func:`set_key`: each process of an instance reads it
from a file only its owner can read, :func:`load_key`), frame 0 ends with a 16-byte
HMAC-SHA256 tag of frame 0 (the header, with every tensor frame's dtype, shape and so size).
:func:`decode` checks it first, before any byte is parsed: a message from a process without
the key (a forged heartbeat, a "bye", a loss report, a dispatch with a forged ``src``,
garbage) is refused as ``auth``. The threat is injection by another process of the host: it
cannot make a frame 0 that passes, and it cannot read or alter the instance's messages in
flight (Unix sockets in a 0700 directory, or loopback), so the tensor frames are not hashed:
hashing them costs about 6 us per 8 KiB here, a few percent of a step. Between hosts (TCP)
that assumption does not hold; there the answer is CURVE (encryption and integrity of every
byte, :mod:`.curve`). Where CURVE carries the instance's sockets (``transport.curve``, the
default), the tag is not added: CURVE has authenticated every byte before a receive loop sees
it, and a second check would only cost time. A process without a key sends and accepts
untagged messages (in-process unit tests).
"""

from __future__ import annotations

from typing import Any

import hmac
import os
from pathlib import Path

import msgpack
import numpy as np
import torch

__all__ = ["encode", "decode", "encode_header", "decode_header", "WireError", "MAGIC",
           "VERSION", "set_key", "load_key", "new_key_file", "TAG_BYTES", "BAD_CONTENT"]

MAGIC = b"REP"
VERSION = 1
MAX_HEADER = 1 << 20
MAX_DIMS = 8

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.bool, torch.uint8, torch.float64)}
_ITEMSIZE = {name: torch.empty((), dtype=d).element_size() for name, d in _DTYPES.items()}
_PREFIX = MAGIC + bytes([VERSION])
TAG_BYTES = 16
_key: bytes | None = None
_tag_key: bytes | None = None


def set_key(key: bytes | None, *, tag: bool = True) -> None:
    """This process's instance key (None: messages are neither tagged nor checked).
    ``tag=False``: the key is held (CURVE derives this process's socket keys from it,
    :mod:`.curve`) but messages are not tagged: CURVE already authenticates every byte."""
    global _key, _tag_key
    if key is not None and len(key) < 16:
        raise ValueError(f"an instance key needs at least 16 bytes, got {len(key)}")
    _key = key
    _tag_key = key if tag else None


def new_key_file(path: str | Path) -> bytes:
    """Make a fresh 32-byte key in ``path``: mode 0600, whole or not at all (another process
    never reads half a key), never overwritten (``FileExistsError``)."""
    key = os.urandom(32)
    tmp = Path(f"{path}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def load_key(path: str | Path) -> bytes:
    """Read an instance key, refusing a file another user owns or others can read."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path}: owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o077:
        raise PermissionError(f"{path}: mode {oct(st.st_mode & 0o777)}, must be 0600")
    key = Path(path).read_bytes()
    if len(key) < 16:
        raise ValueError(f"{path}: {len(key)} bytes, an instance key has at least 16")
    return key


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")[:TAG_BYTES]


BAD_CONTENT = (KeyError, TypeError, ValueError, IndexError, AttributeError)
"""What a handler raises on a well-formed message whose fields are wrong: receive loops catch
these, drop the message and count it, and go on."""


class WireError(ValueError):
    """A message that is not one of ours; ``reason`` says which check it failed."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"malformed message ({reason}): {detail}")


_PROCESS = PROCESS = object()
"""The default of every ``key`` parameter: this process's key (:func:`set_key`; for tags, the
key unless it was set with ``tag=False``)."""


def process_key() -> bytes | None:
    return _key


def encode_header(header: dict[str, Any], *, key=_PROCESS) -> bytes:
    """Frame 0 of a message (the whole message when it has no tensors). ``key``: this
    process's instance key unless given (a host of several instances passes each its own)."""
    key = _tag_key if key is _PROCESS else key
    body = _PREFIX + msgpack.packb(header, use_bin_type=True)
    if key is None:
        return body
    return body + _tag(key, body)


def decode_header(frame, *, key=_PROCESS) -> dict[str, Any]:
    key = _tag_key if key is _PROCESS else key
    raw = _bytes(frame)
    if key is not None:
        if len(raw) < len(_PREFIX) + TAG_BYTES:
            raise WireError("auth", "no tag")
        raw, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        if not hmac.compare_digest(tag, _tag(key, raw)):
            raise WireError("auth", "the tag does not match this instance's key")
    if len(raw) < len(_PREFIX) or raw[: len(MAGIC)] != MAGIC:
        raise WireError("magic", f"frame 0 does not start with {MAGIC!r}")
    if raw[len(MAGIC)] != VERSION:
        raise WireError("version", f"version {raw[len(MAGIC)]}, this build reads {VERSION}")
    if len(raw) > MAX_HEADER:
        raise WireError("header", f"{len(raw)} bytes, at most {MAX_HEADER}")
    try:
        header = msgpack.unpackb(raw[len(_PREFIX):], raw=False, strict_map_key=True)
    except Exception as e:  # every way msgpack rejects bytes
        raise WireError("header", f"not msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise WireError("header", f"a {type(header).__name__}, not a map")
    return header


def encode(header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> list:
    specs, frames = [], []
    for t in tensors:
        t = t.detach().contiguous().cpu()
        specs.append([str(t.dtype), list(t.shape)])
        frames.append(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return [encode_header(dict(header, tensors=specs)), *frames]


def decode(frames: list) -> tuple[dict[str, Any], list[torch.Tensor]]:
    if not frames:
        raise WireError("header", "no frames")
    header = decode_header(frames[0])
    specs = header.pop("tensors", [])
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise WireError("tensors", f"{len(frames) - 1} tensor frame(s) for specs {specs!r:.80}")
    out = []
    for spec, frame in zip(specs, frames[1:]):
        dtype, shape = _check_spec(spec)
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        nbytes = memoryview(buf).nbytes
        want = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype] if shape else _ITEMSIZE[dtype]
        if nbytes != want:
            raise WireError("size", f"{dtype}{list(shape)} needs {want} bytes, got {nbytes}")
        dt = _DTYPES[dtype]
        if want == 0:
            out.append(torch.empty(shape, dtype=dt))
            continue
        t = torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=torch.uint8)
        out.append(t.view(dt).view(shape))
    return header, out


def _check_spec(spec) -> tuple[str, tuple[int, ...]]:
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
            and isinstance(spec[1], list)):
        raise WireError("tensors", f"spec {spec!r:.80} is not [dtype, shape]")
    dtype, shape = spec
    if dtype not in _DTYPES:
        raise WireError("tensors", f"dtype {dtype!r:.40} is not one of {sorted(_DTYPES)}")
    if len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
        raise WireError("tensors", f"shape {shape!r:.80} is not up to {MAX_DIMS} sizes >= 0")
    return dtype, tuple(shape)


def _bytes(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
