import pytest
import torch

from resilient_ep.runtime import batch_invariant
from resilient_ep.runtime.model import MoEModel
from resilient_ep.runtime.model_builder import make_model

MAX_TOKENS = 24


def workload(n: int = 12) -> list[list[int]]:
    """Prompts of different lengths over the tiny vocabulary (deterministic)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(5, 700, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("runtime") / "model")


@pytest.fixture(scope="session")
def prompts():
    return workload()


@pytest.fixture(scope="session")
def reference(model_dir):
    """Greedy outputs of the single-process model: what every run must reproduce."""
    torch.set_num_threads(1)
    m = MoEModel.load(model_dir, linear=batch_invariant.linear, attention_mode="per_row")
    m.experts.linear = batch_invariant.linear
    return [m.generate_greedy(p, MAX_TOKENS) for p in workload()]
