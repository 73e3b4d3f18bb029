"""Workloads for the demo and the benchmarks: deterministic prompts, the tiny model's home,
and the single-process reference that failure runs are compared against."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["default_model_dir", "ensure_model", "prompts", "reference_outputs"]


def default_model_dir() -> Path:
    base = os.environ.get("RESILIENT_EP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resilient-ep")
    return Path(base) / "models" / "tiny-qwen3-moe"


def ensure_model(model_dir: str | Path | None = None, *, quiet: bool = False) -> Path:
    """The tiny Qwen3-MoE checkpoint, built on first use (a few seconds)."""
    from .model_builder import make_model

    path = Path(model_dir) if model_dir else default_model_dir()
    if not quiet and not (path / "config.json").exists():
        print(f"building the tiny Qwen3-MoE checkpoint in {path} ...", flush=True)
    return make_model(path)


def prompts(n: int, *, seed: int = 1234, min_len: int = 3, max_len: int = 20,
            vocab: tuple[int, int] = (5, 700)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=g))
        out.append(torch.randint(vocab[0], vocab[1], (length,), generator=g).tolist())
    return out


def reference_outputs(model_dir: str | Path, prompt_list: list[list[int]], max_tokens: int,
                      *, exact: bool = True) -> list[list[int]]:
    """Greedy outputs of the whole model in one process: the failure-free oracle."""
    from . import batch_invariant
    from .model import MoEModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if exact:
            m = MoEModel.load(model_dir, linear=batch_invariant.linear, attention_mode="per_row")
            m.experts.linear = batch_invariant.linear
        else:
            m = MoEModel.load(model_dir)
        return [m.generate_greedy(p, max_tokens) for p in prompt_list]
    finally:
        torch.set_num_threads(threads)
