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


@pytest.fixture
def netbed(request):
    """A two-node network test bed (``resilient_ep.netbed``), removed afterwards even when the
    test fails; ``@pytest.mark.netbed(nodes=3, link="emulated")`` changes its shape. Skipped
    where beds cannot be made (not root, no iproute2)."""
    from resilient_ep.netbed import NetBed, netbed_available

    why = netbed_available()
    if why is not None:
        pytest.skip(f"network test bed: {why}")
    marker = request.node.get_closest_marker("netbed")
    kw = dict(marker.kwargs) if marker else {}
    bed = NetBed(kw.pop("nodes", 2), **kw).start()
    try:
        yield bed
    finally:
        bed.close()
