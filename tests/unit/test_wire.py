"""The wire format trusts nothing: every malformed frame is refused with a reason before any
of it is used, random bytes never raise anything but WireError, and no pickle is involved."""

from __future__ import annotations

import os
import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_ep.transport import wire
from resilient_ep.transport.wire import WireError


def _h(obj) -> bytes:
    return wire.MAGIC + bytes([wire.VERSION]) + msgpack.packb(obj, use_bin_type=True)


def test_round_trip_and_unknown_fields_pass_through():
    x, n = torch.randn(3, 4), torch.arange(5)
    h, (a, b) = wire.decode(wire.encode({"t": "x", "epoch": 2, "future_field": [1]}, [x, n]))
    assert h == {"t": "x", "epoch": 2, "future_field": [1]}
    assert torch.equal(a, x) and torch.equal(b, n)
    h, (e,) = wire.decode(wire.encode({"t": "e"}, [torch.empty(0, 7)]))
    assert e.shape == (0, 7)


@pytest.mark.parametrize("frames, reason", [
    ([], "header"),
    ([b""], "magic"),
    ([b"\x80\x04\x95"], "magic"),                              # a pickle
    ([wire.MAGIC + b"\x02" + msgpack.packb({})], "version"),
    ([wire.MAGIC + b"\x01\xc1"], "header"),                    # not msgpack
    ([_h([1, 2])], "header"),                                  # not a map
    ([_h({1: "x"})], "header"),                                # a non-string key
    ([_h({"t": "x", "tensors": [["torch.float32", [2]]]})], "tensors"),      # a spec, no frame
    ([_h({"t": "x"}), b"1234"], "tensors"),                            # a frame, no spec
    ([_h({"t": "x", "tensors": [["object", [1]]]}), b"1234"], "tensors"),
    ([_h({"t": "x", "tensors": [["torch.float32", [-1]]]}), b"1234"], "tensors"),
    ([_h({"t": "x", "tensors": [["torch.float32", [1] * 9]]}), b"1234"], "tensors"),
    ([_h({"t": "x", "tensors": [["torch.float32", [True]]]}), b"1234"], "tensors"),
    ([_h({"t": "x", "tensors": "torch.float32"}), b"1234"], "tensors"),
    ([_h({"t": "x", "tensors": [["torch.float32", [2]]]}), b"1234"], "size"),  # 4 bytes for 8
    ([_h({"t": "x", "tensors": [["torch.float32", [1 << 30, 1 << 30]]]}), b"1234"], "size"),
])
def test_malformed_frames_are_refused_with_a_reason(frames, reason):
    with pytest.raises(WireError) as e:
        wire.decode(frames)
    assert e.value.reason == reason


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_bytes_only_ever_raise_wire_errors(frames):
    try:
        wire.decode(frames)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1)
                    | st.text(max_size=8)
                    | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                         max_size=4),
                    max_leaves=12),
       st.lists(st.binary(max_size=32), max_size=3))
def test_random_headers_with_prefix_only_ever_raise_wire_errors(obj, extra):
    try:
        wire.decode([_h({"t": "x", "tensors": obj}), *extra])
    except WireError:
        pass


@pytest.fixture
def keyed():
    wire.set_key(b"k" * 32)
    yield b"k" * 32
    wire.set_key(None)


def test_with_an_instance_key_only_tagged_messages_from_that_key_pass(keyed):
    x = torch.randn(2, 3)
    h, (y,) = wire.decode(wire.encode({"t": "c", "src": 1}, [x]))
    assert h == {"t": "c", "src": 1} and torch.equal(x, y)
    assert wire.decode_header(wire.encode_header({"t": "alive"})) == {"t": "alive"}
    forged = [
        [wire.encode_header({"t": "bye", "src": 1}, key=None)],            # no key at all
        [wire.encode_header({"t": "bye", "src": 1}, key=b"x" * 32)],       # another key
        [b"REP\x01" + b"\x00" * 20],
    ]
    good = wire.encode({"t": "c", "src": 1}, [x])
    tampered = [bytes(good[0][:-17]) + b"\x00" + bytes(good[0][-16:]), good[1]]  # header
    for frames in [*forged, tampered]:
        with pytest.raises(WireError) as e:
            wire.decode(frames)
        assert e.value.reason == "auth"
    # a host of several instances passes each its own key
    other = wire.encode_header({"t": "x"}, key=b"o" * 32)
    assert wire.decode_header(other, key=b"o" * 32) == {"t": "x"}


def test_key_files_are_private(tmp_path):
    import os

    key = wire.new_key_file(tmp_path / "k")
    assert wire.load_key(tmp_path / "k") == key and len(key) == 32
    assert (os.stat(tmp_path / "k").st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        wire.new_key_file(tmp_path / "k")  # never overwritten
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(PermissionError, match="0600"):
        wire.load_key(tmp_path / "k")


def test_curve_keeps_a_process_without_the_key_out(tmp_path):
    """Every socket of an instance is a CURVE server or client with keys derived from the
    instance key: a member connects and is heard; a process without the key (plain socket,
    or CURVE with keys of its own) never gets a byte through; a different instance's key
    gives different keys."""
    import time

    import pytest
    import zmq

    from resilient_ep.transport import curve

    if not curve.available():
        pytest.skip("libzmq without CURVE")
    key = os.urandom(32)
    assert curve.keypairs(key) == curve.keypairs(key) != curve.keypairs(os.urandom(32))
    ctx = zmq.Context()
    ep = f"ipc://{tmp_path}/s"
    inbox = curve.server(ctx.socket(zmq.PULL), key=key)
    inbox.bind(ep)
    member = curve.client(ctx.socket(zmq.PUSH), key=key)
    plain = ctx.socket(zmq.PUSH)
    stranger = curve.client(ctx.socket(zmq.PUSH), key=os.urandom(32))
    for s in (member, plain, stranger):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
    try:
        for _ in range(20):
            plain.send(b"forged", zmq.NOBLOCK)
            stranger.send(b"forged too", zmq.NOBLOCK)
        member.send(b"ours")
        got = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            if inbox.poll(100):
                got.append(inbox.recv())
        assert got == [b"ours"]
    finally:
        for s in (inbox, member, plain, stranger):
            s.close(linger=0)
        ctx.term()
