"""ZeroMQ CURVE on every socket of an instance: a process without the instance's key cannot
even connect.

The keys come from the instance key (:mod:`.wire`: a 0600 file each process of the instance
reads): a server keypair and a client keypair, each the Curve25519 key whose secret is an
HMAC of the instance key, so every process that holds the key derives the same four keys and
no other file is handed around. Every socket that binds is a CURVE server with the server
secret; every socket that connects knows the server's public key and uses the client pair. A
process that does not hold the instance key does not know the server's public key and its
handshake fails before any of its bytes reaches a receive loop (libzmq drops the connection;
nothing to count, nothing to parse). CURVE also encrypts and authenticates every byte in
flight, which the HMAC tag of :mod:`.wire` (kept: it is what a receive loop checks) does not
do for tensor frames: it is what makes a TCP transport between hosts safe.

``server(sock)`` / ``client(sock)`` must be called before ``bind`` / ``connect``. With no key
(in-process unit tests), with ``transport.curve: false``, or where libzmq was built without
CURVE (:func:`available`), they do nothing and the HMAC tag alone authenticates.
"""

from __future__ import annotations

import functools
import hmac

import zmq
from zmq.utils import z85

from . import wire

__all__ = ["available", "keypairs", "server", "client", "set_enabled", "enabled"]

_enabled = True


def available() -> bool:
    """libzmq was built with CURVE (libsodium)."""
    return bool(zmq.has("curve"))


def set_enabled(on: bool) -> None:
    """This process's ``transport.curve`` (every process of an instance must agree)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled and available()


@functools.lru_cache(maxsize=16)
def keypairs(key: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """``((server public, server secret), (client public, client secret))``, Z85-encoded,
    derived from the instance key (once per key: every socket of a process asks)."""
    def pair(label: bytes) -> tuple[bytes, bytes]:
        secret = z85.encode(hmac.digest(key, label, "sha256"))
        return zmq.curve_public(secret), secret

    return pair(b"resilient-ep curve server v1"), pair(b"resilient-ep curve client v1")


def _key_of(key):
    key = wire.process_key() if key is wire.PROCESS else key
    return key if key is not None and enabled() else None


def server(sock: zmq.Socket, *, key=wire.PROCESS) -> zmq.Socket:
    """Make ``sock`` (not bound yet) a CURVE server of the instance whose key is ``key``
    (default: this process's)."""
    key = _key_of(key)
    if key is not None:
        (spub, ssec), _ = keypairs(bytes(key))
        sock.curve_server = True
        sock.curve_secretkey = ssec
        sock.curve_publickey = spub
    return sock


def client(sock: zmq.Socket, *, key=wire.PROCESS) -> zmq.Socket:
    """Make ``sock`` (not connected yet) a CURVE client of the instance whose key is ``key``."""
    key = _key_of(key)
    if key is not None:
        (spub, _), (cpub, csec) = keypairs(bytes(key))
        sock.curve_serverkey = spub
        sock.curve_publickey = cpub
        sock.curve_secretkey = csec
    return sock
