"""Where replicas go and how a location string becomes a store.

- ``peer``: replicas on the next ``replicas`` live ranks after the owner, in ring order
  (never the owner: a checkpoint on the dying rank is useless). Location ``peer:<rank>``.
  With the ranks' nodes known (``peer_nodes``, several hosts), ranks on other nodes come
  first, from the owner's mirror partner on (``r + ranks per node``): a node lost whole
  keeps its requests' checkpoints, and the copies spread evenly.
- ``shm`` / ``file``: ``replicas`` directories ``<base>/store-<i>`` shared by every rank of
  the host; they outlive the owner. Locations ``shm:<i>`` / ``file:<i>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .store import CheckpointStore

__all__ = ["StoreSpec", "StoreSet"]


@dataclass(frozen=True)
class StoreSpec:
    """Neutral description of the stores of one run (what a rank needs to open them)."""

    kind: str
    """``peer`` | ``shm`` | ``file``."""
    replicas: int
    peer_endpoints: tuple[str, ...] = ()
    """``peer``: the store server endpoint of each rank."""
    peer_nodes: tuple[int, ...] = ()
    """``peer``, several hosts: the node of each rank (empty: one node)."""
    base_dir: str = ""
    """``shm`` / ``file``: the directory holding ``store-<i>``."""
    durable: bool = True
    """``file``: fsync each save."""

    def __post_init__(self) -> None:
        if self.kind not in ("peer", "shm", "file"):
            raise ValueError(f"kv_checkpoint.store must be peer, shm or file, got {self.kind!r}")
        if self.replicas < 1:
            raise ValueError(f"kv_checkpoint.replicas must be >= 1, got {self.replicas}")
        if self.kind == "peer" and not self.peer_endpoints:
            raise ValueError("a peer store needs the peer endpoints")
        if self.peer_nodes and len(self.peer_nodes) != len(self.peer_endpoints):
            raise ValueError(f"peer_nodes has {len(self.peer_nodes)} entries for "
                             f"{len(self.peer_endpoints)} peer endpoints")
        if self.kind != "peer" and not self.base_dir:
            raise ValueError(f"a {self.kind} store needs base_dir")

    def targets(self, owner: int, live: Iterable[int]) -> list[str]:
        """Locations an owner saves its replicas to (fewer than ``replicas`` if too few ranks live)."""
        if self.kind != "peer":
            return [f"{self.kind}:{i}" for i in range(self.replicas)]
        n = len(self.peer_endpoints)
        live = set(live)
        ring = [(owner + k) % n for k in range(1, n)]
        if self.peer_nodes:
            # Other nodes first (a copy must outlive the owner's node), starting one node
            # over: the owner's mirror partner (the rank the experts mirror onto) first, so
            # the copies spread evenly over the ranks.
            home, shift = self.peer_nodes[owner], n // len(set(self.peer_nodes))
            ring.sort(key=lambda r: (self.peer_nodes[r] == home, (r - owner - shift) % n))
        return [f"peer:{r}" for r in ring if r in live][: self.replicas]

    def candidates(self, live: Iterable[int]) -> list[str]:
        """Every location a restore may look at."""
        if self.kind != "peer":
            return [f"{self.kind}:{i}" for i in range(self.replicas)]
        return [f"peer:{r}" for r in sorted(set(live))]

    def open(self, location: str, *, ctx=None) -> CheckpointStore:
        kind, _, idx = location.partition(":")
        if kind != self.kind:
            raise ValueError(f"location {location!r} is not a {self.kind} store")
        i = int(idx)
        if kind == "peer":
            from .peer_store import PeerStore
            return PeerStore(self.peer_endpoints[i], location, ctx=ctx)
        from .dir_store import FileStore, ShmStore
        path = Path(self.base_dir) / f"store-{i}"
        if kind == "shm":
            return ShmStore(path, location)
        return FileStore(path, location, durable=self.durable)


class StoreSet:
    """Open stores by location, lazily; owned by one thread."""

    def __init__(self, spec: StoreSpec, *, ctx=None):
        self.spec = spec
        self.ctx = ctx
        self._open: dict[str, CheckpointStore] = {}
        self.epoch, self.members = 0, None
        self._outside: frozenset[int] = frozenset()
        """Peer ranks the newest membership (``abort_outside``, any thread) left out: their
        stores answer nothing, opened before or after (a restore or save made under an older
        membership must not wait out its deadline on one of them)."""

    def get(self, location: str) -> CheckpointStore:
        s = self._open.get(location)
        if s is None:
            s = self._open[location] = self.spec.open(location, ctx=self.ctx)
            if self.members is not None:
                s.configure(self.epoch, self.members)
            self._abort_if_outside(location, s)
        return s

    def _abort_if_outside(self, location: str, store: CheckpointStore) -> None:
        if self.spec.kind == "peer" and int(location.partition(":")[2]) in self._outside:
            store.abort()

    def configure(self, epoch: int, members: Iterable[int]) -> None:
        self.epoch, self.members = epoch, frozenset(members)
        if self.spec.kind == "peer":  # a dead rank's store is gone: close its socket
            for loc in [l for l in self._open if int(l.partition(":")[2]) not in self.members]:
                self.drop(loc)
        for loc, s in self._open.items():
            s.configure(epoch, self.members)
            self._abort_if_outside(loc, s)  # a newer membership said so: it wins

    def abort_outside(self, members: Iterable[int]) -> None:
        """From any thread: interrupt calls to peer stores of ranks that left (a hung rank's
        server never answers; the caller must not wait out its deadline)."""
        if self.spec.kind != "peer":
            return
        members = set(members)
        self._outside = frozenset(set(range(len(self.spec.peer_endpoints))) - members)
        for loc, s in list(self._open.items()):
            if int(loc.partition(":")[2]) not in members:
                s.abort()

    def drop(self, location: str) -> None:
        """Close a store (e.g. its rank died); reopened on next use."""
        s = self._open.pop(location, None)
        if s is not None:
            s.shutdown()

    def shutdown(self) -> None:
        for s in self._open.values():
            s.shutdown()
        self._open.clear()
