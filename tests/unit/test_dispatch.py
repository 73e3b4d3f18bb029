"""Dispatch/combine across in-process ranks equals the plain-torch oracle, before and after a
rank drops out mid-exchange."""

import time

import pytest
import torch
import zmq

from resilient_ep.placement import place, replan
from resilient_ep.routing import RoutingTable
from resilient_ep.runtime import batch_invariant
from resilient_ep.runtime.model import ExpertBank
from resilient_ep.runtime.model_builder import make_model
from resilient_ep.transport.dispatch import MoEExchange, serve_dispatch
from resilient_ep.transport.reference import reference_moe
from resilient_ep.transport.zmq_transport import ZmqTransport, data_endpoint

R, E, K = 3, 8, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ep") / "model", num_experts=E)


@pytest.fixture
def world(tmp_path, model_dir):
    layout = place(num_layers=2, num_experts=E, num_ranks=R, slots_per_rank=6)  # 2 replicas each
    ctx = zmq.Context()
    eps = [data_endpoint("ipc", str(tmp_path), r) for r in range(R)]
    ts = [ZmqTransport(r, eps, ctx=ctx) for r in range(R)]
    for t in ts:
        assert t.wait_connected(range(R), time.monotonic() + 5) == []
    banks = [ExpertBank.load(model_dir, {l: layout.experts_on_rank(l, r) for l in range(2)})
             for r in range(R)]
    for b in banks:
        b.linear = batch_invariant.linear
    yield layout, ts, banks
    for t in ts:
        t.shutdown()
    ctx.term()


def _pump(ts, banks, exchanges, live, rounds=2000):
    for _ in range(rounds):
        if all(x.complete for r, x in exchanges.items()):
            return
        for r in live:
            msg = ts[r].recv(time.monotonic() + 0.002)
            if msg is None:
                continue
            h, tensors = msg
            if h["t"] == "dispatch":
                serve_dispatch(ts[r], banks[r], h, tensors)
            elif h["t"] == "combine" and r in exchanges:
                exchanges[r].on_combine(h, tensors)
    raise AssertionError("exchange did not complete")


def _inputs(seed, T=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 128, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x, ids, w / w.sum(1, keepdim=True)


def _oracle(model_dir, layer, x, ids, w):
    full = ExpertBank.load(model_dir, {layer: list(range(E))})
    full.linear = batch_invariant.linear
    return reference_moe(x, ids, w, lambda e, rows: full.forward(layer, torch.full((rows.shape[0],), e), rows))


def test_exchange_matches_oracle(world, model_dir):
    layout, ts, banks = world
    tables = [RoutingTable(layout) for _ in range(R)]
    inputs = {r: _inputs(r) for r in range(R)}
    ex = {r: MoEExchange(rank=r, transport=ts[r], table=tables[r], bank=banks[r], layer=1, step=0,
                         x=inputs[r][0], topk_ids=inputs[r][1], topk_weights=inputs[r][2])
          for r in range(R)}
    _pump(ts, banks, ex, range(R))
    for r in range(R):
        res = ex[r].result()
        assert not res.degraded.any()
        assert torch.equal(res.out, _oracle(model_dir, 1, *inputs[r])), "bit-exact"


def test_reroute_after_owner_dies_mid_exchange(world, model_dir):
    layout, ts, banks = world
    tables = [RoutingTable(layout) for _ in range(R)]
    x, ids, w = _inputs(7, T=16)
    ex = {0: MoEExchange(rank=0, transport=ts[0], table=tables[0], bank=banks[0], layer=0, step=0,
                         x=x, topk_ids=ids, topk_weights=w)}
    assert any(d == 2 for d, _ in ex[0].pending.values()), "the test needs choices sent to rank 2"
    # Rank 2 dies before answering: drop what it received, mask it, reroute.
    while ts[2].recv(time.monotonic() + 0.05) is not None:
        pass
    live = torch.tensor([True, True, False])
    tables[0].update(replan(layout, [2]).layout, live, epoch=1)
    ts[0].configure(1, {0, 1})
    ex[0].reroute(frozenset({0, 1}))
    _pump(ts, banks, ex, [0, 1])
    res = ex[0].result()
    assert not res.degraded.any(), "every expert has a replica on ranks 0/1"
    assert torch.equal(res.out, _oracle(model_dir, 0, x, ids, w)), "bit-exact"


def test_uncovered_expert_degrades_or_fails(world, model_dir):
    layout, ts, banks = world
    # Only rank 0 live: experts it does not hold are uncovered.
    table = RoutingTable(layout, torch.tensor([True, False, False]))
    held = set(layout.experts_on_rank(0, 0))
    x, ids, w = _inputs(3)
    for mode in ("degrade", "fail"):
        ex = MoEExchange(rank=0, transport=ts[0], table=table, bank=banks[0], layer=0, step=0,
                         x=x, topk_ids=ids, topk_weights=w, on_uncovered=mode)
        assert ex.complete, "nothing to wait for: all choices local or dropped"
        res = ex.result()
        lost = torch.tensor([[int(e) not in held for e in row] for row in ids.tolist()])
        assert torch.equal(res.degraded, lost.any(1))
        assert set(res.uncovered) == set(range(E)) - held
        if mode == "fail":
            assert torch.equal(res.failed, lost.any(1))
        else:
            assert not res.failed.any()


def test_uncovered_expert_waits_until_covered_again(world, model_dir):
    """``wait``: choices of experts with no live replica hold the exchange open; once the table
    covers them again (a repair, a rejoin) they are sent and the result is bit-exact."""
    layout, ts, banks = world
    table = RoutingTable(layout, torch.tensor([True, False, False]))
    held = set(layout.experts_on_rank(0, 0))
    x, ids, w = _inputs(3)
    assert any(int(e) not in held for e in ids.view(-1).tolist()), "the test needs a lost expert"
    repairing = frozenset(range(E)) - held
    ex = {0: MoEExchange(rank=0, transport=ts[0], table=table, bank=banks[0], layer=0, step=0,
                         x=x, topk_ids=ids, topk_weights=w, on_uncovered="wait",
                         wait_for=repairing)}
    assert not ex[0].complete and ex[0].waited and ex[0].waiting.numel()
    table.update(layout, torch.tensor([True, True, True]), epoch=1)  # covered again
    ex[0].reroute(frozenset({0, 1, 2}))
    _pump(ts, banks, ex, [0, 1, 2])
    res = ex[0].result()
    assert not res.degraded.any() and not res.failed.any()
    assert torch.equal(res.out, _oracle(model_dir, 0, x, ids, w)), "bit-exact"
    # No repair in time: the waiting choices degrade (counted as degraded), nothing hangs.
    ex2 = MoEExchange(rank=0, transport=ts[0], table=RoutingTable(
        layout, torch.tensor([True, False, False])), bank=banks[0], layer=0, step=0, x=x,
        topk_ids=ids, topk_weights=w, on_uncovered="wait", wait_for=repairing)
    ex2.stop_waiting()
    assert ex2.complete and ex2.result().degraded.any()
    # Nothing is being repaired: there is nothing to wait for, the choice degrades at once.
    ex3 = MoEExchange(rank=0, transport=ts[0], table=RoutingTable(
        layout, torch.tensor([True, False, False])), bank=banks[0], layer=0, step=0, x=x,
        topk_ids=ids, topk_weights=w, on_uncovered="wait")
    assert ex3.complete and ex3.result().degraded.any()


def test_a_table_that_disagrees_with_the_weights_degrades_instead_of_recursing(world, model_dir):
    """Rank 0's table routes every expert to rank 0 itself, but rank 0 holds only some of
    them: the choices it cannot serve are refused by its own bank each time. They degrade
    after a bounded number of routings; the step completes (before: RecursionError)."""
    layout, ts, _ = world
    rows = layout.physical_to_logical.clone()
    own = layout.slots_of_rank(0)
    for layer in range(2):  # every slot of rank 0 claims expert 0..5, the rest empty
        rows[layer] = -1
        rows[layer, list(own)] = torch.arange(len(own)) % E
    lying = type(layout).from_mapping(rows, num_ranks=R, num_experts=E,
                                      max_replicas=layout.max_replicas)
    bank = ExpertBank.load(model_dir, {l: [0, 1] for l in range(2)})  # holds 0 and 1 only
    table = RoutingTable(lying)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 128, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 4], [1, 2], [3, 5]])
    w = torch.full((6, 2), 0.5)
    ex = MoEExchange(rank=0, transport=ts[0], table=table, bank=bank, layer=0, step=0,
                     x=x, topk_ids=ids, topk_weights=w)
    assert ex.complete
    res = ex.result()
    assert res.degraded.tolist() == [False, True, True, True, True, True]
