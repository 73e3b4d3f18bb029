"""Socket monitors that cannot stall ZeroMQ.

libzmq sends a socket's monitor events from the context's I/O thread with a *blocking* send
on an inproc PAIR. ``Socket.get_monitor_socket`` connects the reading end with the default
high-water mark, so once about a thousand events wait unread (a peer that accepts and drops
connections makes hundreds a second; a group that runs no collective for a while reads
none) the I/O thread blocks, and every socket of the process stops sending and receiving:
its liveness beacon (the rank is then fenced as frozen), its groups' messages, vLLM's own
engine-core sockets. Seen in CI as a survivor "stopped answering" at a join and a replacement
READY but deaf to every call (``docs/vllm-rejoin.md``). :func:`monitor_socket` makes the
reading end unbounded (the inproc pipe then has no limit), and its owner reads it
regularly (``LiveGroup`` also while idle, from its heartbeat thread).

The same blocking send hangs the I/O thread for good when the reading end is closed first:
closing a monitored socket emits its last events later, from the I/O thread, into a PAIR
that has no peer any more (every group retired at a join did that, in that order).
:func:`close_monitored` stops the monitor before it closes either end.
"""

from __future__ import annotations

import itertools

import zmq

__all__ = ["monitor_socket", "close_monitored"]

_seq = itertools.count()


def monitor_socket(sock: zmq.Socket, events: int) -> zmq.Socket:
    """A PAIR socket receiving ``sock``'s ``events`` (``recv_monitor_message`` reads it),
    whose pipe never fills: libzmq's I/O thread never blocks on it."""
    addr = f"inproc://resilient-ep-monitor-{id(sock):x}-{next(_seq)}"
    sock.monitor(addr, events)
    mon = sock.context.socket(zmq.PAIR)
    mon.setsockopt(zmq.LINGER, 0)
    mon.setsockopt(zmq.RCVHWM, 0)  # before connect: the inproc pipe's limit is set there
    mon.connect(addr)
    return mon


def close_monitored(sock: zmq.Socket, mon: zmq.Socket | None) -> None:
    """Close a monitored socket and its monitor's reading end, in the one safe order: the
    monitor stopped first (no event is sent after), then the socket, then the reader."""
    if not sock.closed:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        sock.close(linger=0)
    if mon is not None and not mon.closed:
        mon.close(linger=0)
