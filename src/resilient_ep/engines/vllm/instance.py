"""Which vLLM instance this process belongs to, and where that instance's private sockets
and files live.

``--enable-resilience`` gives every instance an id (``additional_config["resilience"]
["instance"]``, written by the front end, so every process of one instance and no other
agrees on it). Its directory ``$TMPDIR/resilient-ep-<uid>/<instance>/`` holds the Unix
sockets of its failover groups (``groups.py``), its liveness socket and membership feed
(``liveness.py``), the fault-injection triggers (``faults.py``) and the instance key.

The directories are private: made mode 0700, and one that exists must belong to this user
(a directory another user planted is refused; one of ours made with the umask is tightened).
The first process of an instance to reach its directory makes the instance key there
(``instance.key``, 0600); every process of the instance then tags and checks every message
with it (``transport/wire.py``), so a process outside the instance can neither inject data nor
change membership. Across nodes (``transport.node_addresses``, ``multinode.py``) the sockets
are TCP at each rank's node address and the key is ``transport.key_file`` (or this
directory's ``instance.key``, copied to the other nodes); only the head makes a key.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from resilient_ep.config import ResilienceConfig

from .config import resilience_config, resilience_settings

__all__ = ["instance_of", "failover_enabled", "instance_dir", "join_instance", "endpoints"]


def instance_of(vllm_config: Any) -> tuple[ResilienceConfig, str] | None:
    extra = getattr(vllm_config, "additional_config", None)
    raw = resilience_settings(extra)
    if raw is None or not raw.get("instance"):
        return None  # off, or not normalized by our front end
    cfg = resilience_config(extra)
    if cfg is None:
        return None
    if cfg.transport.node_addresses:  # several hosts: where this instance's sockets live
        from . import multinode
        multinode.register(str(raw["instance"]), cfg, vllm_config.parallel_config)
    return cfg, str(raw["instance"])


def failover_enabled(vllm_config: Any) -> bool:
    """Resilience on, data parallel > 1 and expert parallel: the failover path applies."""
    if os.environ.get("RESILIENT_EP_VLLM_FAILOVER", "1") == "0":
        return False  # the benchmark's "off" arm: vLLM's own datapath, EP patches only
    pc = vllm_config.parallel_config
    return (instance_of(vllm_config) is not None and int(pc.data_parallel_size) > 1
            and bool(pc.enable_expert_parallel))


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
        from . import multinode
        nodes = multinode.registered(instance)
        if nodes is None:
            _use_key(root / "instance.key")
        else:
            path, may_make = multinode.own_key_file(nodes, root)
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
    directory, or TCP at each rank's node across nodes (``multinode.py``)."""
    root = join_instance(instance)
    from . import multinode
    remote = multinode.endpoints(instance, kind, size)
    if remote is not None:
        return remote
    return [f"ipc://{root}/{kind}-{r}" for r in range(size)]
