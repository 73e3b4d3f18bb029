"""Conformance test every transport passes, plus the wire format."""

import time

import pytest
import torch
import zmq

from resilient_ep.transport import wire
from resilient_ep.transport.zmq_transport import ZmqTransport, data_endpoint


def test_wire_round_trip():
    ts = [torch.randn(3, 4), torch.arange(5), torch.zeros(0, 7), torch.tensor([True, False])]
    header, out = wire.decode(wire.encode({"t": "x", "epoch": 3}, ts))
    assert header["t"] == "x" and header["epoch"] == 3
    for a, b in zip(ts, out):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _zmq_world(tmp_path, n):
    ctx = zmq.Context()
    eps = [data_endpoint("ipc", str(tmp_path), r) for r in range(n)]
    ts = [ZmqTransport(r, eps, ctx=ctx) for r in range(n)]
    for t in ts:
        assert t.wait_connected(range(n), time.monotonic() + 5) == []
    return ctx, ts


TRANSPORTS = [pytest.param(_zmq_world, id="zmq_ipc")]


@pytest.mark.parametrize("make", TRANSPORTS)
def test_transport_conformance(tmp_path, make):
    ctx, (a, b, c) = make(tmp_path, 3)
    try:
        x = torch.randn(4, 8)
        assert a.send(1, {"t": "dispatch", "id": (0, 1)}, [x])
        h, (y,) = b.recv(time.monotonic() + 2)
        assert h["src"] == 0 and h["epoch"] == 0 and h["id"] == (0, 1) and torch.equal(x, y)

        # Every receive has a deadline.
        t0 = time.monotonic()
        assert b.recv(t0 + 0.05) is None
        assert 0.04 <= time.monotonic() - t0 < 1.0

        # abort() interrupts a blocked receive.
        b.abort()
        assert b.recv(time.monotonic() + 5) is None

        # A rank outside the members is fenced: its messages are dropped, sends to it refused.
        b.configure(1, {0, 1})
        assert c.send(1, {"t": "late"}, [])
        assert b.recv(time.monotonic() + 0.2) is None
        assert not b.send(2, {"t": "x"}, [])
        assert a.send(1, {"t": "ok"}, [])
        h, _ = b.recv(time.monotonic() + 2)
        assert h["t"] == "ok"

        # A rank admitted under a newer epoch that b has not applied yet: held, not dropped.
        c.configure(2, {0, 1, 2})
        assert c.send(1, {"t": "early"}, [torch.ones(2)])
        assert b.recv(time.monotonic() + 0.2) is None
        b.configure(2, {0, 1, 2})
        h, (t,) = b.recv(time.monotonic() + 2)
        assert h["t"] == "early" and h["src"] == 2 and torch.equal(t, torch.ones(2))
        assert b.errored() is None
    finally:
        for t in (a, b, c):
            t.shutdown()
        ctx.term()


def test_send_to_dead_peer_is_refused_not_blocking(tmp_path):
    ctx, (a, b) = _zmq_world(tmp_path, 2)
    try:
        b.shutdown()
        deadline = time.monotonic() + 5
        while a.send(1, {"t": "x"}, [torch.zeros(1)]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not a.send(1, {"t": "x"}, [torch.zeros(1)])
    finally:
        a.shutdown()
        ctx.term()
