"""The link emulator of an ``emulated`` test bed: one TUN device per node, IPv4 packets
forwarded between them in user space, each delayed and dropped as ``tc netem`` would.

Why: the kernel of the machines this project is tested on has no ``sch_netem`` (nor ``fq``,
so no BPF-timestamp delay either), yet the multi-node tests need a slow, lossy link. The
emulator does in one process what ``tc qdisc add dev eth0 root netem delay D loss P`` does on
a node's interface:

- **delay** ``delay_ms``: every packet *leaving* that node is held that long (a constant
  delay keeps the order, as netem's does); set it on both nodes for a symmetric RTT
  (10 ms on each side: 20 ms RTT);
- **loss** ``loss``: every packet leaving that node is dropped with that probability,
  independently (netem's default loss model), from a seeded generator;
- **down** (``up: false``): the cable is cut: every packet from *or to* the node is dropped.

Started by :class:`~.namespaces.NetBed` as ``python -m resilient_ep.netbed.linkemu --nodes N
--subnet A.B.C --seed S`` inside the bed's switch namespace: it makes TUN devices ``t0`` ...
``t<N-1>`` there and prints ``ready``; the bed moves each into its node's namespace (the file
descriptor stays with the emulator) and addresses it ``A.B.C.<i+1>``. Then one JSON object a
line on stdin sets a node's link, ``{"node": i, "delay_ms": d, "loss": p, "up": true}`` (keys
left out keep their value), answered ``ok`` (or ``error: ...``) on stdout. End of stdin ends
the emulator, and the TUN devices with it.

Cost: one Python process moves every packet between the nodes (a few ten thousand packets a
second on one core), so an ``emulated`` bed is for the slow-link tests; ``bridge`` beds move
packets in the kernel.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import heapq
import json
import os
import random
import select
import struct
import sys
import time

__all__ = ["Link", "main"]

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class Link:
    """One node's link: what happens to the packets that leave it (and, when down, enter it)."""

    __slots__ = ("delay_s", "loss", "up")

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.loss = 0.0
        self.up = True

    def set(self, cmd: dict) -> None:
        delay = float(cmd.get("delay_ms", self.delay_s * 1000.0))
        loss = float(cmd.get("loss", self.loss))
        up = cmd.get("up", self.up)
        if not 0.0 <= delay <= 60_000.0:
            raise ValueError(f"delay_ms must be in [0, 60000], got {delay}")
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be in [0, 1], got {loss}")
        if not isinstance(up, bool):
            raise ValueError(f"up must be true or false, got {up!r}")
        self.delay_s, self.loss, self.up = delay / 1000.0, loss, up


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Emulator:
    def __init__(self, nodes: int, subnet: str, seed: int):
        self.subnet = tuple(int(x) for x in subnet.split("."))
        if len(self.subnet) != 3 or not all(0 <= x <= 255 for x in self.subnet):
            raise ValueError(f"subnet must look like 10.213.0, got {subnet!r}")
        self.fds = [open_tun(f"t{i}") for i in range(nodes)]
        self.node_of_fd = {fd: i for i, fd in enumerate(self.fds)}
        self.links = [Link() for _ in range(nodes)]
        self.rng = random.Random(seed)
        self.queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, dst node, packet)
        self.seq = 0
        self.counters = {"forwarded": 0, "dropped_loss": 0, "dropped_down": 0, "other": 0}

    def _dst_node(self, pkt: bytes) -> int | None:
        if len(pkt) < 20 or pkt[0] >> 4 != 4 or tuple(pkt[16:19]) != self.subnet:
            return None  # not IPv4 to the bed's subnet (IPv6 router solicitations, ...)
        j = pkt[19] - 1
        return j if 0 <= j < len(self.fds) else None

    def _take(self, src: int, pkt: bytes, now: float) -> None:
        dst = self._dst_node(pkt)
        if dst is None or dst == src:
            self.counters["other"] += 1
            return
        a, b = self.links[src], self.links[dst]
        if not (a.up and b.up):
            self.counters["dropped_down"] += 1
            return
        if a.loss and self.rng.random() < a.loss:
            self.counters["dropped_loss"] += 1
            return
        if a.delay_s <= 0.0 and not self.queue:
            self._deliver(dst, pkt)
            return
        self.seq += 1
        heapq.heappush(self.queue, (now + a.delay_s, self.seq, dst, pkt))

    def _deliver(self, dst: int, pkt: bytes) -> None:
        if not self.links[dst].up:  # cut while the packet was in flight
            self.counters["dropped_down"] += 1
            return
        try:
            os.write(self.fds[dst], pkt)
            self.counters["forwarded"] += 1
        except OSError as e:  # the device is down or gone (the bed is being removed)
            if e.errno not in (errno.EIO, errno.EAGAIN, errno.EBADFD, errno.EINVAL):
                raise

    def _command(self, line: str) -> str:
        try:
            cmd = json.loads(line)
            if not isinstance(cmd, dict):
                raise ValueError("a command is a JSON object")
            if cmd.get("op") == "counters":
                return json.dumps(self.counters)
            node = cmd.get("node")
            if type(node) is not int or not 0 <= node < len(self.links):
                raise ValueError(f"node must be 0..{len(self.links) - 1}, got {node!r}")
            self.links[node].set(cmd)
            return "ok"
        except (ValueError, TypeError) as e:
            return f"error: {e}"

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        buf = b""
        watch = [stdin, *self.fds]
        while True:
            now = time.monotonic()
            while self.queue and self.queue[0][0] <= now:
                _, _, dst, pkt = heapq.heappop(self.queue)
                self._deliver(dst, pkt)
            timeout = max(0.0, self.queue[0][0] - now) if self.queue else 1.0
            ready, _, _ = select.select(watch, [], [], timeout)
            now = time.monotonic()
            for fd in ready:
                if fd == stdin:
                    chunk = os.read(stdin, 65536)
                    if not chunk:
                        return  # the bed is gone: so are we
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            print(self._command(line.decode()), flush=True)
                    continue
                src = self.node_of_fd[fd]
                for _ in range(256):
                    try:
                        pkt = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.EBADFD, errno.EIO):
                            break
                        raise
                    self._take(src, pkt, now)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resilient_ep.netbed.linkemu")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--subnet", default="10.213.0")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    emu = Emulator(args.nodes, args.subnet, args.seed)
    print("ready", flush=True)
    try:
        emu.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
