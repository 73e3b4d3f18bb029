"""The host-memory backup of expert weights: one copy of every expert per node, in shared
memory, filled when the weights are loaded.

A directory (on ``/dev/shm`` where the machine has it: files there live in RAM, and outlive
the process that wrote them) of one safetensors file per (layer, expert) holding that
expert's tensors in the engine's runtime format, exactly as they sit in a slot. Every rank
writes the experts it holds after loading; the first writer of an expert wins (a rename makes
each file appear whole), so the node keeps each expert once however many ranks hold a copy.
A repair reads the file back (memory-mapped) and copies it into the target slot: no
conversion, no disk.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["HostBackup", "default_root"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def default_root(name: str) -> Path:
    """``/dev/shm/resilient-ep-<uid>/<name>/experts`` (the temp dir where there is no /dev/shm)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"resilient-ep-{os.getuid()}" / name / "experts"


class HostBackup:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, layer: str, expert: int) -> Path:
        return self.root / _SAFE.sub("_", str(layer)) / f"{int(expert)}.safetensors"

    def has(self, layer: str, expert: int) -> bool:
        return self._path(layer, expert).is_file()

    def put(self, layer: str, expert: int, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Store ``expert``'s tensors of ``layer`` unless present. True when this call wrote it."""
        from safetensors.torch import save_file

        path = self._path(layer, expert)
        if path.is_file():
            return False
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        try:
            os.link(tmp, path)  # atomic, and fails if another rank was first
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, layer: str, expert: int) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(layer, expert)
        try:
            return load_file(str(path))
        except FileNotFoundError:
            return None

    def nbytes(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*.safetensors"))

    def experts(self) -> dict[str, list[int]]:
        """Layer key -> experts stored."""
        if not self.root.is_dir():
            return {}
        return {d.name: sorted(int(p.stem) for p in d.glob("*.safetensors"))
                for d in sorted(self.root.iterdir()) if d.is_dir()}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
