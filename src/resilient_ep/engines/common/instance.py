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
neither connect, inject data nor change membership. Single node: ranks on other hosts need
TCP endpoints, not built yet.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["instance_dir", "join_instance", "endpoints"]


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
        _use_key(root / "instance.key")
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


def _use_key(path: Path) -> None:
    from resilient_ep.transport import curve, wire

    try:
        key = wire.new_key_file(path)
    except FileExistsError:
        key = wire.load_key(path)
    wire.set_key(key, tag=not curve.enabled())  # CURVE authenticates every byte, or the tag


def endpoints(instance: str, kind: str, size: int) -> list[str]:
    root = join_instance(instance)
    return [f"ipc://{root}/{kind}-{r}" for r in range(size)]
