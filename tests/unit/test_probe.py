"""The probe forward's pieces (``resilient_ep.probe``): inputs every process makes alike,
fingerprints, and the comparison a rejoin makes with them."""

from __future__ import annotations

import math

import pytest
import torch

from resilient_ep.probe import (FINGERPRINT_DIM, PROBE_TOKENS, compare, expert_key, fingerprint,
                                probe_input, probe_token_ids)


def _linear(weight: torch.Tensor, name: str = "layers.0.qkv_proj") -> dict:
    x = probe_input(name, (PROBE_TOKENS, weight.shape[1]))
    return {name: fingerprint(name, x @ weight.T)}


def test_inputs_depend_on_the_name_only():
    a = probe_input("layers.3.o_proj", (4, 16), torch.float32)
    assert torch.equal(a, probe_input("layers.3.o_proj", (4, 16), torch.float32))
    assert not torch.equal(a, probe_input("layers.4.o_proj", (4, 16), torch.float32))
    assert probe_input("x", (4, 16), torch.bfloat16).dtype == torch.bfloat16
    ids = probe_token_ids("embed", 50)
    assert ids.shape == (PROBE_TOKENS,) and int(ids.max()) < 50
    assert torch.equal(ids, probe_token_ids("embed", 50))


def test_fingerprint_shape_and_norm_column():
    y = torch.randn(3, 2, 40)
    fp = fingerprint("n", y)
    assert len(fp) == 6 and all(len(r) == FINGERPRINT_DIM + 1 for r in fp)
    assert fp[0][-1] == pytest.approx(float(y.reshape(6, 40)[0].norm()), rel=1e-6)


def test_equal_modules_agree_and_rounding_is_tolerated():
    w = torch.randn(32, 16)
    assert compare(_linear(w), _linear(w.clone())) == []
    # the same weights computed in another order: rounding only
    name = "layers.0.qkv_proj"
    x = probe_input(name, (PROBE_TOKENS, 16))
    y = (x.double() @ w.double().T).float()
    assert compare(_linear(w), {name: fingerprint(name, y)}) == []


@pytest.mark.parametrize("change", ["one_weight", "transposed_halves", "scaled"])
def test_a_different_computation_is_caught(change):
    w = torch.randn(32, 16)
    other = w.clone()
    if change == "one_weight":
        other[5, 3] += 0.05
    elif change == "transposed_halves":  # e.g. gate and up stacked the other way round
        other = torch.cat([w[16:], w[:16]])
    else:
        other = w * (1 + 1e-3)
    bad = compare(_linear(w), _linear(other))
    assert len(bad) == 1 and "relative error" in bad[0]["why"], bad


def test_missing_shape_and_nan_are_mismatches():
    w = torch.randn(8, 4)
    mine = _linear(w)
    assert compare(mine, {}) == [{"name": "layers.0.qkv_proj", "why": "missing there"}]
    assert compare({}, mine, names=["layers.0.qkv_proj"]) == \
        [{"name": "layers.0.qkv_proj", "why": "missing here"}]
    short = {"layers.0.qkv_proj": mine["layers.0.qkv_proj"][:2]}
    assert "shape" in compare(mine, short)[0]["why"]
    nan = {"layers.0.qkv_proj": [[math.nan] * (FINGERPRINT_DIM + 1)] * PROBE_TOKENS}
    assert compare(mine, nan)[0]["why"].startswith("relative error")


def test_expert_keys_name_layer_and_expert():
    assert expert_key("model.layers.1.mlp.experts", 7) == "model.layers.1.mlp.experts#expert7"
