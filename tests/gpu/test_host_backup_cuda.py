"""The host backup's repair path onto a GPU: mapped file -> pinned staging -> slot, exact."""

import pytest
import torch

from resilient_ep.repair import HostBackup
from resilient_ep.repair.staging import copy_weights

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_backup_to_gpu_slot_is_bitwise_and_reuses_its_buffer(tmp_path):
    b = HostBackup(tmp_path / "experts")
    g = torch.Generator().manual_seed(0)
    experts = {e: {"w13": torch.randn(64, 32, generator=g).to(torch.bfloat16),
                   "w2": torch.randn(32, 16, generator=g).to(torch.bfloat16)} for e in range(3)}
    for e, t in experts.items():
        b.put("layers.0.experts", e, t)
    slots = {k: torch.full((3, *v.shape), -1, dtype=v.dtype, device="cuda")
             for k, v in experts[0].items()}
    for e in (2, 0, 1):
        for k, v in b.get("layers.0.experts", e).items():
            copy_weights(slots[k][e], v)  # the staging buffer is reused between copies
    for e, t in experts.items():
        for k in t:
            assert torch.equal(slots[k][e].cpu(), t[k])
