"""Socket monitors must never stall ZeroMQ's I/O thread (``transport/monitors.py``): a peer
that accepts and drops connections floods a monitor with events; unread, libzmq's default
monitor pipe fills and every socket of the process stops (seen in CI: a rank fenced as
frozen at a join, a replacement deaf to every call)."""

from __future__ import annotations

import socket
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from resilient_ep.config import DetectorConfig
from resilient_ep.transport.group import LiveGroup
from resilient_ep.transport.monitors import monitor_socket

EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


def _flapping_listener(path: str):
    """A unix socket that accepts every connection and closes it at once."""
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(128)

    def serve():
        while True:
            try:
                c, _ = lst.accept()
            except OSError:
                return
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return lst


def _count(mon) -> int:
    n = 0
    while True:
        try:
            recv_monitor_message(mon, flags=zmq.NOBLOCK)
        except zmq.Again:
            return n
        n += 1


FLAP_S = 6.0
"""Long enough for libzmq's default monitor pipe to fill (it stalled after about 5 s here)."""


def test_an_unread_monitor_of_a_flapping_peer_leaves_the_other_sockets_working(tmp_path):
    """For ``FLAP_S`` nobody reads a monitor flooded by a flapping peer, while an unrelated
    pair of sockets of the same context exchanges messages: none is ever late, and the
    events are all there to read afterwards."""
    ctx = zmq.Context()
    lst = _flapping_listener(str(tmp_path / "flap"))
    socks = []
    try:
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.RECONNECT_IVL, 5)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
        mon = monitor_socket(s, EVENTS)
        s.connect(f"ipc://{tmp_path}/flap")
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        socks = [s, mon, pull, push]
        pull.bind(f"ipc://{tmp_path}/b")
        push.connect(f"ipc://{tmp_path}/b")
        got, end = 0, time.monotonic() + FLAP_S
        while time.monotonic() < end:
            push.send(b"x")
            assert pull.poll(2000), f"the context stalled after {got} messages"
            pull.recv()
            got += 1
            time.sleep(0.002)
        assert _count(mon) > 1000  # past libzmq's default pipe, and nothing stalled
    finally:
        for sock in socks:
            sock.close(linger=0)
        lst.close()
        ctx.term()


def test_an_idle_group_reads_its_monitors_from_its_heartbeat_thread(tmp_path):
    """A group that runs no collective (between a join's preparation and its switch, or an
    idle instance) still drains its monitors: its heartbeat thread reads them."""
    lst = _flapping_listener(str(tmp_path / "g-1"))
    ctx = zmq.Context()
    group = LiveGroup("g", 0, [f"ipc://{tmp_path}/g-0", f"ipc://{tmp_path}/g-1"], ctx=ctx,
                      detector=DetectorConfig(heartbeat_interval_ms=10,
                                              heartbeat_timeout_ms=3000))
    try:
        time.sleep(1.0)  # hundreds of events meanwhile
        with group._busy:  # (the heartbeat thread stays out while this runs)
            left = sum(_count(m) for m in group._monitors)
        assert left < 100, f"{left} events unread after 1 s idle"
    finally:
        group.shutdown()
        lst.close()
        ctx.term()


def test_closing_monitored_sockets_never_stalls_the_context(tmp_path):
    """A connected, monitored socket closed again and again, as a group retired at a join
    closes its sockets: the monitor is stopped first, so the events of the closing never go
    into a reading end that is gone (libzmq's I/O thread would block on it for good: the
    old order stalled this context after 50 and after 287 closes in two of four runs of 300)."""
    from resilient_ep.transport.monitors import close_monitored

    ctx = zmq.Context()
    pull, a, b = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind(f"ipc://{tmp_path}/p")
        a.bind(f"ipc://{tmp_path}/a")
        b.connect(f"ipc://{tmp_path}/a")
        for i in range(1000):
            s = ctx.socket(zmq.PUSH)
            mon = monitor_socket(s, EVENTS)
            s.connect(f"ipc://{tmp_path}/p")
            time.sleep(0.002)
            close_monitored(s, mon)
            b.send(b"x")
            assert a.poll(3000), f"the context stalled after {i} closes"
            a.recv()
    finally:
        for sock in (pull, a, b):
            sock.close(linger=0)
        ctx.term()
