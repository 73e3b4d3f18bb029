import pytest
import torch

from resilient_ep.layout import ExpertLayout, LayoutError


@pytest.mark.parametrize("p2l, R, E, l2p, counts", [
    pytest.param([[0, 1, 2, 3, 0, -1]], 2, 4, [[[0, 4], [1, -1], [2, -1], [3, -1]]], [[2, 1, 1, 1]],
                 id="docstring_example"),
    pytest.param([[1, 0, 1, 0]], 2, 2, [[[1, 3], [0, 2]]], [[2, 2]], id="two_replicas_each"),
    pytest.param([[0, 1], [1, 0]], 2, 2, [[[0], [1]], [[1], [0]]], [[1, 1], [1, 1]], id="two_layers"),
])
def test_from_mapping_worked_tables(p2l, R, E, l2p, counts):
    lay = ExpertLayout.from_mapping(p2l, num_ranks=R, num_experts=E)
    assert lay.logical_to_physical.tolist() == l2p
    assert lay.replica_count.tolist() == counts


def test_trivial_and_queries():
    lay = ExpertLayout.trivial(2, 4, 2, 3)
    assert lay.physical_to_logical.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert lay.experts_on_rank(0, 1) == [3, 0, 1]
    assert lay.replica_ranks(0, 0) == [0, 1]
    assert lay.uncovered([0]) == [(0, 3), (1, 3)]
    assert lay.live_replica_count([1]).tolist() == [[1, 1, 0, 1]] * 2
    assert lay.rank_load(torch.ones(2, 4)).tolist() == [[2.0, 2.0]] * 2


def test_max_replicas_padding():
    lay = ExpertLayout.trivial(1, 2, 2, 1, max_replicas=3)
    assert lay.logical_to_physical.tolist() == [[[0, -1, -1], [1, -1, -1]]]
    with pytest.raises(LayoutError, match="max_replicas"):
        ExpertLayout.from_mapping([[0, 0, 1, 1]], num_ranks=2, num_experts=2, max_replicas=1)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(physical_to_logical=[[0, 5]], num_ranks=1, num_experts=2), "outside", id="bad_id"),
    pytest.param(dict(physical_to_logical=[[0, 1, 0]], num_ranks=2, num_experts=2), "multiple", id="bad_slots"),
])
def test_from_mapping_errors(kwargs, match):
    with pytest.raises(LayoutError, match=match):
        ExpertLayout.from_mapping(**kwargs)


def test_post_init_catches_inconsistent_tensors():
    lay = ExpertLayout.trivial(1, 2, 2, 1)
    with pytest.raises(LayoutError, match="disagrees"):
        ExpertLayout(lay.physical_to_logical, lay.logical_to_physical.flip(1), lay.replica_count, 2, 1)
    with pytest.raises(LayoutError, match="R\\*S"):
        ExpertLayout(lay.physical_to_logical, lay.logical_to_physical, lay.replica_count, 3, 1)
    with pytest.raises(LayoutError, match="exceeds"):
        ExpertLayout.trivial(1, 5, 2, 2)
