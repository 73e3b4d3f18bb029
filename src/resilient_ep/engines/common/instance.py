"""An instance's private directory and key, the same for every engine adapter.

Every instance (one engine launch with resilience on) has an id its front end makes and hands
to every process it starts. Its directory ``$TMPDIR/resilient-ep-<uid>/<instance>/`` holds the
instance's Unix sockets (failover groups, liveness socket, membership feed), fault-injection
triggers and the instance key.

The directories are private: made mode 0700, and one that exists must belong to this user
(a directory another user planted is refused; one of ours made with the umask is tightened).
The first process of an instance to reach its directory makes the instance key there
(``instance.key``, 0600); every process of the instance then derives its ZeroMQ CURVE keys
from it, or tags and checks every message with it where libzmq has no CURVE
(``transport/curve.py``, ``transport/wire.py``), so a process outside the instance can
neither connect, inject data nor change membership. Across hosts an adapter registers the
instance's nodes (:func:`across_nodes`, e.g. ``engines/vllm/multinode.py``): its sockets are
then TCP at each rank's node address and its key is the nodes' key file (only the head
makes one).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Protocol

__all__ = ["instance_dir", "join_instance", "endpoints", "across_nodes", "Nodes"]


class Nodes(Protocol):
    """Where a multi-host instance's sockets and key live."""

    def endpoints(self, kind: str, size: int) -> list[str]:
        """The TCP endpoints of the instance's ``kind`` sockets (``size`` members)."""

    def key_path(self, instance_dir: Path) -> tuple[str, bool]:
        """The instance key's file, and whether this process may make it."""


_nodes: dict[str, Any] = {}


def across_nodes(instance: str, nodes: Nodes) -> None:
    """``instance`` runs on several hosts: its endpoints and key are ``nodes``'."""
    _nodes[instance] = nodes


def instance_dir(instance: str) -> Path:
    """This instance's private directory (its Unix sockets, fault-injection triggers, key)."""
    if not instance or "/" in instance or instance.startswith("."):
        raise ValueError(f"instance id {instance!r} is not a plain name")
    base = Path(tempfile.gettempdir()) / f"resilient-ep-{os.getuid()}"
    root = base / instance
    for d in (base, root):
        _private_dir(d)
    return root


def join_instance(instance: str) -> Path:
    """Make this process speak for ``instance``: every message it sends is tagged with the
    instance's key and every one it receives checked (made by the first process to join).
    Called by whatever builds one of the instance's socket addresses. Returns its directory."""
    root = instance_dir(instance)
    if instance not in _keyed:
        nodes = _nodes.get(instance)
        if nodes is None:
            _use_key(root / "instance.key")
        else:
            path, may_make = nodes.key_path(root)
            _use_key(Path(path), make=may_make)
        _keyed.add(instance)
    return root


_keyed: set[str] = set()


def _private_dir(d: Path) -> None:
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{d} is not a directory (a link or a file is there)")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{d} belongs to uid {st.st_uid}, not to this user "
                              f"({os.getuid()}): refusing to put sockets there")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)


def _use_key(path: Path, *, make: bool = True) -> None:
    from resilient_ep.transport import curve, wire

    if not make and not path.exists():
        raise FileNotFoundError(
            f"resilient-ep: the instance key {path} is missing on this node: copy it from the "
            "head (the same path, mode 0600) or set transport.key_file (docs/multinode.md)")
    try:
        key = wire.new_key_file(path)
    except FileExistsError:
        key = wire.load_key(path)
    wire.set_key(key, tag=not curve.enabled())  # CURVE authenticates every byte, or the tag


def endpoints(instance: str, kind: str, size: int) -> list[str]:
    """Where the ``size`` members of the instance's ``kind`` sockets bind: Unix sockets in its
    directory, or TCP at each rank's node across hosts."""
    root = join_instance(instance)
    nodes = _nodes.get(instance)
    if nodes is not None:
        return nodes.endpoints(kind, size)
    return [f"ipc://{root}/{kind}-{r}" for r in range(size)]
