"""Stores in a directory: local shared memory (``/dev/shm``, tmpfs) and files (any file system;
with fsync they survive the whole host restarting).

Per request two files: ``<key>.kv`` (the blocks, block ``i`` at byte ``i * block_bytes``) and
``<key>.meta`` (JSON, replaced atomically by rename after the blocks are written), ``key`` the
request id in hex. Any process on the host can open the same directory: a restoring rank
reads what a dead rank wrote. A store "dies" with its directory (the tmpfs for ``shm``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .meta import CheckpointMeta, _dtype
from .store import CheckpointStore, StoreError, check_put

__all__ = ["DirStore", "ShmStore", "FileStore", "default_shm_dir"]


def default_shm_dir(name: str) -> Path:
    base = Path("/dev/shm")
    return (base if base.is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))) / name


class DirStore(CheckpointStore):
    def __init__(self, path: str | os.PathLike, location: str, *, durable: bool):
        self.path = Path(path)
        self.location = location
        self.durable = durable
        """fsync blocks and metadata before a save returns (files that survive a power loss)."""
        self.path.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ files
    def _files(self, rid: str) -> tuple[Path, Path]:
        key = rid.encode().hex()
        return self.path / f"{key}.kv", self.path / f"{key}.meta"

    def _check(self, deadline: float) -> None:
        if self._aborted:
            raise StoreError(f"{self.location}: aborted")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{self.location}: deadline passed")
        if not self.path.is_dir():
            raise StoreError(f"{self.location}: directory {self.path} is gone")

    def _read_meta(self, path: Path) -> CheckpointMeta | None:
        try:
            return CheckpointMeta.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise StoreError(f"{self.location}: unreadable metadata {path.name}: {e}") from None

    def put(self, meta, first, blocks, deadline):
        self._check(deadline)
        data_path, meta_path = self._files(meta.rid)
        old = self._read_meta(meta_path)
        have = 0
        if old is not None and data_path.exists():
            have = min(old.num_blocks, data_path.stat().st_size // old.block_bytes)
        check_put(old, have, meta, first, blocks, self.epoch, self.members)
        raw = blocks.detach().contiguous().view(torch.uint8).numpy()
        try:
            fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if first == 0:
                    os.ftruncate(fd, 0)
                os.pwrite(fd, memoryview(raw.reshape(-1)), first * meta.block_bytes)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(meta.to_dict(), f)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, meta_path)
            if self.durable:
                dfd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise StoreError(f"{self.location}: cannot save {meta.rid}: {e}") from None

    def head(self, rid, deadline):
        self._check(deadline)
        return self._read_meta(self._files(rid)[1])

    def get(self, rid, deadline):
        self._check(deadline)
        data_path, meta_path = self._files(rid)
        meta = self._read_meta(meta_path)
        if meta is None:
            return None
        try:
            with open(data_path, "rb") as f:
                raw = f.read(meta.num_blocks * meta.block_bytes)
        except FileNotFoundError:
            raw = b""
        k = len(raw) // meta.block_bytes
        if k == 0:
            return meta, torch.empty((0, *meta.block_shape), dtype=_dtype(meta.dtype))
        t = torch.frombuffer(bytearray(raw[: k * meta.block_bytes]), dtype=torch.uint8)
        return meta, t.view(_dtype(meta.dtype)).view(k, *meta.block_shape)

    def delete(self, rid, deadline):
        for p in self._files(rid):
            p.unlink(missing_ok=True)

    def rids(self, deadline):
        self._check(deadline)
        return sorted(bytes.fromhex(p.stem).decode() for p in self.path.glob("*.meta"))


class ShmStore(DirStore):
    """Local shared memory: a directory on ``/dev/shm`` (tmpfs), no fsync. Survives any process,
    not the host."""

    def __init__(self, path: str | os.PathLike, location: str = "shm:0"):
        super().__init__(path, location, durable=False)


class FileStore(DirStore):
    """Files, fsynced: survive the whole host restarting (on a persistent file system)."""

    def __init__(self, path: str | os.PathLike, location: str = "file:0", *, durable: bool = True):
        super().__init__(path, location, durable=durable)
