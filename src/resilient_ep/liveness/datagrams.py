"""Heartbeats and leases between hosts, as UDP datagrams.

Why not TCP: a heartbeat stream is sparse (one small message per interval), so TCP cannot
fast-retransmit a lost segment; it waits for its retransmission timer (200 ms at least on
Linux, doubled on each further loss), and every later heartbeat queues behind the lost one.
Measured on the emulated link of the test bed (10 ms each way, 1 % loss each way, one
ZeroMQ TCP connection, 50 ms heartbeats, 60 s): 38 gaps over 150 ms, the longest 1.8 s. A
datagram that is lost is just one heartbeat less: three in a row must go missing (1e-6 at
1 % loss) before a 150 ms timeout fires.

- :class:`LeaseBeacon` (a rank): every ``interval_s`` sends ``{"t": "alive", "rank", "pid",
  "seq", "boot"}`` to the front end's datagram socket and reads the answers. Each answer
  ``{"t": "lease", "rank", "seq", "boot"}`` renews the rank's lease until the time the
  heartbeat ``seq`` was *sent* plus ``lease_s``: the holder's lease never outlives the
  front end's view of it (the front end counts its timeout from the later arrival).
  :meth:`LeaseBeacon.holds_lease` is what the rank asks before it starts a step and before
  it emits a token.
- :class:`BeaconReceiver` (the front end): the bound datagram socket (``fileno()`` for a
  poller); :meth:`~BeaconReceiver.receive` returns the heartbeats that pass every check, and
  :meth:`~BeaconReceiver.grant` answers one with a lease (the host decides which: a live
  rank only).

Trust: a datagram cannot ride ZeroMQ CURVE, so each carries an HMAC-SHA256 tag (the wire
format's tag, :mod:`resilient_ep.transport.wire`) under a key derived from the instance
key: a process without the key can neither forge a heartbeat nor a lease. Against replay of
captured datagrams, each sender numbers its messages (``seq``, per process ``boot``, a
random id): a heartbeat not newer than the last one accepted from that boot is dropped
(``replay``), as is one from a boot the receiver has seen replaced; a lease answers only a
heartbeat the rank sent and has not seen answered. Heartbeats carry no secret: they are
authenticated, not encrypted.
"""

from __future__ import annotations

import hmac
import os
import select
import socket
import threading
import time
from collections import Counter, OrderedDict

from ..transport import wire

__all__ = ["LeaseBeacon", "BeaconReceiver", "datagram_key"]

MAX_DATAGRAM = 512
KEEP_BOOTS = 64
"""Retired boots remembered per receiver (a replayed heartbeat of an older process is
dropped)."""


def datagram_key(instance_key: bytes) -> bytes:
    """The key that tags the instance's datagrams (derived: never the instance key itself)."""
    return hmac.digest(instance_key, b"resilient-ep datagram v1", "sha256")


class LeaseBeacon:
    """A rank's heartbeat to the front end over UDP, and the lease it earns (module
    docstring). ``frontend``: ``(host, port)``; ``bind_host``: the address to send from
    (the rank's node); ``key``: the instance key."""

    def __init__(self, frontend: tuple[str, int], rank: int, interval_s: float, lease_s: float,
                 *, key: bytes, bind_host: str | None = None):
        self.frontend = (str(frontend[0]), int(frontend[1]))
        self.rank = int(rank)
        self.interval_s = float(interval_s)
        self.lease_s = float(lease_s)
        self._key = datagram_key(key)
        self.boot = os.urandom(8).hex()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind_host or "0.0.0.0", 0))
        self.sock.setblocking(False)
        self._seq = 0
        self._sent: OrderedDict[int, float] = OrderedDict()   # seq -> monotonic send time
        self._acked = 0
        self.lease_until = 0.0
        """Monotonic time the lease runs out (0: never granted)."""
        self.dropped: Counter[str] = Counter()
        self.sent = 0
        self.granted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"resilient-ep-lease-{rank}")
        self._thread.start()

    def holds_lease(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.lease_until

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()

    def _run(self) -> None:
        next_send = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_send:
                    self._send(now)
                    next_send = now + self.interval_s
                ready, _, _ = select.select([self.sock], [], [], max(0.0, next_send - now))
                if ready:
                    self._read()
        except OSError:
            if not self._stop.is_set():
                raise

    def _send(self, now: float) -> None:
        self._seq += 1
        self._sent[self._seq] = now
        while len(self._sent) > 256:
            self._sent.popitem(last=False)
        msg = wire.encode_header({"t": "alive", "rank": self.rank, "pid": os.getpid(),
                                  "seq": self._seq, "boot": self.boot}, key=self._key)
        try:
            self.sock.sendto(msg, self.frontend)
            self.sent += 1
        except OSError:  # no route (a cut cable, the node's link down): the next one may pass
            self.dropped["send"] += 1

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error of an earlier send (port unreachable)
                self.dropped["icmp"] += 1
                continue
            try:
                h = wire.decode_header(data, key=self._key)
            except wire.WireError as e:
                self.dropped[e.reason] += 1
                continue
            seq = h.get("seq")
            if (h.get("t") != "lease" or h.get("rank") != self.rank or h.get("boot") != self.boot
                    or type(seq) is not int):
                self.dropped["fields"] += 1
                continue
            sent_at = self._sent.get(seq)
            if sent_at is None or seq <= self._acked:
                self.dropped["replay"] += 1
                continue
            self._acked = seq
            self.granted += 1
            self.lease_until = max(self.lease_until, sent_at + self.lease_s)


class BeaconReceiver:
    """The front end's datagram socket for the ranks' heartbeats (module docstring).
    ``ranks``: the ranks of the instance; anything else is dropped."""

    def __init__(self, bind: tuple[str, int], ranks, *, key: bytes):
        self.ranks = frozenset(int(r) for r in ranks)
        self._key = datagram_key(key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(bind[0]), int(bind[1])))
        self.sock.setblocking(False)
        self._last: dict[int, tuple[str, int]] = {}       # rank -> (boot, last seq)
        self._retired: dict[int, OrderedDict] = {}         # rank -> boots seen replaced
        self.dropped: Counter[str] = Counter()
        """Datagrams dropped, by reason (``auth``, ``fields``, ``replay``, ``non_member``...)."""
        self.granted = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def receive(self) -> list[tuple[int, int, int, str, tuple]]:
        """Every heartbeat waiting: ``(rank, pid, seq, boot, sender address)``, checked."""
        out = []
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                self.dropped["icmp"] += 1
                continue
            got = self._check(data)
            if got is not None:
                out.append((*got, addr))

    def _check(self, data: bytes):
        try:
            h = wire.decode_header(data, key=self._key)
        except wire.WireError as e:
            self.dropped[e.reason] += 1
            return None
        rank, pid, seq, boot = h.get("rank"), h.get("pid"), h.get("seq"), h.get("boot")
        if (h.get("t") != "alive" or type(rank) is not int or type(pid) is not int
                or type(seq) is not int or not isinstance(boot, str)):
            self.dropped["fields"] += 1
            return None
        if rank not in self.ranks:
            self.dropped["non_member"] += 1
            return None
        last = self._last.get(rank)
        retired = self._retired.setdefault(rank, OrderedDict())
        if boot in retired or (last is not None and last[0] == boot and seq <= last[1]):
            self.dropped["replay"] += 1
            return None
        if last is not None and last[0] != boot:  # a new process for the rank
            retired[last[0]] = True
            while len(retired) > KEEP_BOOTS:
                retired.popitem(last=False)
        self._last[rank] = (boot, seq)
        return rank, pid, seq, boot

    def grant(self, rank: int, seq: int, boot: str, addr) -> None:
        """Answer heartbeat ``seq`` of ``rank`` (from ``addr``) with a lease."""
        msg = wire.encode_header({"t": "lease", "rank": int(rank), "seq": int(seq),
                                  "boot": boot}, key=self._key)
        try:
            self.sock.sendto(msg, addr)
            self.granted += 1
        except OSError:
            self.dropped["send"] += 1
