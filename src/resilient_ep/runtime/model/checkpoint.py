"""Checkpoint reading: :class:`CheckpointReader` reads single tensors (one expert, one row of a
fused stack) lazily from a safetensors checkpoint, without ``transformers``."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch

from .weights import ExpertWeights

__all__ = ["CheckpointReader"]


class CheckpointReader:
    """Reads single tensors from a safetensors checkpoint (one file or an indexed shard set).

    Use as a context manager; files are opened lazily with ``safetensors.safe_open`` so that
    reading one expert reads only that expert's bytes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self._key_file = {k: self.path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.path}")
            self._key_file = {}
            from safetensors import safe_open

            for f in files:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        self._key_file[k] = f
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def _handle(self, key: str):
        if key not in self._key_file:
            raise KeyError(f"tensor {key!r} not in checkpoint {self.path}")
        f = self._key_file[key]
        if f not in self._open:
            from safetensors import safe_open

            self._open[f] = self._stack.enter_context(safe_open(f, framework="pt"))
        return self._open[f]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that row."""
        return self._handle(key).get_slice(key)[index]

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """Weights of one logical expert, per-expert keys or v5 fused ``gate_up_proj``/``down_proj``."""
        pre = f"model.layers.{layer}.mlp.experts"
        per = f"{pre}.{expert}.gate_proj.weight"
        if per in self:
            gate = self.get(per)
            up = self.get(f"{pre}.{expert}.up_proj.weight")
            down = self.get(f"{pre}.{expert}.down_proj.weight")
            return ExpertWeights(torch.cat([gate, up], dim=0), down)
        fused = f"{pre}.gate_up_proj"
        if fused in self:
            return ExpertWeights(self.get_row(fused, expert), self.get_row(f"{pre}.down_proj", expert))
        raise KeyError(f"expert {expert} of layer {layer} not found in {self.path} (looked for {per}, {fused})")
