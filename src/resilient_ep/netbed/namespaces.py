""":class:`NetBed`: "nodes" made of Linux network namespaces on one machine.

Layout of a bed with tag ``T`` and ``n`` nodes (every name unique to the run, so parallel runs
never collide; the host's own namespace is never touched):

- ``rep-T-sw``: the switch namespace. ``link="bridge"``: a bridge ``br0`` there, one veth
  per node (``n<i>`` on the bridge, ``eth0`` in the node); packets move in the kernel.
  ``link="emulated"``: the link emulator (:mod:`.linkemu`) runs there and each node's
  ``eth0`` is one of its TUN devices; packets move through it, delayed and dropped at will.
- ``rep-T-n<i>``: node ``i``, address ``<subnet>.<i+1>/24`` on ``eth0``, plus ``lo``.

What a test does with it:

- ``bed.popen(i, argv)`` runs a process on node ``i`` (``ip netns exec``); ``bed.prefix(i)``
  is that prefix for a launcher of its own;
- ``with bed.entered(i):`` moves *the calling thread* into node ``i`` (``setns``); sockets it
  makes and threads it starts live there (a front end run in the test process);
- ``bed.kill_node(i)``: SIGKILL every process of node ``i`` at once (a node lost; with
  ``power_off=True`` the link is cut first, so no FIN or RST tells anyone: only silence);
- ``bed.set_link(i, up=False)`` / ``up=True``: cut or mend node ``i``'s cable (a partition);
- ``bed.impair(i, delay_ms=10, loss=0.01)``: ``emulated`` beds only, as ``tc netem`` on the
  node's interface (egress).

``close()`` (or leaving ``with NetBed(...)``) kills what still runs in the namespaces and
removes them, also after a failed test; :func:`cleanup_stale` removes the beds of a run that
was killed before it could (the creator's pid is in the tag). Needs root (``ip netns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["NetBed", "NetBedError", "cleanup_stale", "netbed_available", "PREFIX"]

PREFIX = "rep-"
"""Every namespace a bed makes is named ``rep-<tag>-...``; the tag starts with the creator's
pid in hex (``<pid>x<random>``)."""

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


class NetBedError(RuntimeError):
    """The bed could not be made or changed (the command and its error are in the message)."""


def _run(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise NetBedError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def netbed_available() -> str | None:
    """None when beds can be made here, else why not (tests skip with it)."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    return None


def _libc():
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetBedError(f"setns: {os.strerror(err)}")


class NetBed:
    """``nodes`` namespaces joined by a switch (module docstring)."""

    def __init__(self, nodes: int = 2, *, link: str = "bridge", subnet: str = "10.213.0",
                 seed: int = 0, tag: str | None = None):
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be in 1..200, got {nodes}")
        if link not in ("bridge", "emulated"):
            raise ValueError(f"link must be 'bridge' or 'emulated', got {link!r}")
        self.nodes = nodes
        self.link = link
        self.subnet = subnet
        self.seed = seed
        self.tag = tag or f"{os.getpid():x}x{secrets.token_hex(2)}"
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.names = [f"{PREFIX}{self.tag}-n{i}" for i in range(nodes)]
        self._emu: subprocess.Popen | None = None
        self._emu_lock = threading.Lock()
        self._made: list[str] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "NetBed":
        why = netbed_available()
        if why is not None:
            raise NetBedError(f"a network test bed {why}")
        cleanup_stale()
        try:
            self._add_ns(self.switch)
            for name in self.names:
                self._add_ns(name)
            if self.link == "bridge":
                self._make_bridge()
            else:
                self._make_emulated()
            for i, name in enumerate(self.names):
                _run("ip", "-n", name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _run("ip", "-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _make_bridge(self) -> None:
        sw = self.switch
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            # Made in place: eth0 in the node, its peer in the switch; nothing in the host.
            _run("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name",
                 f"n{i}", "netns", sw)
            _run("ip", "-n", sw, "link", "set", f"n{i}", "master", "br0")
            _run("ip", "-n", sw, "link", "set", f"n{i}", "up")

    def _make_emulated(self) -> None:
        self._emu = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, "-m",
             "resilient_ep.netbed.linkemu", "--nodes", str(self.nodes), "--subnet", self.subnet,
             "--seed", str(self.seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self._emu.stdout.readline().strip()
        if line != "ready":
            raise NetBedError(f"link emulator did not start (said {line!r})")
        for i, name in enumerate(self.names):
            _run("ip", "-n", self.switch, "link", "set", f"t{i}", "netns", name)
            _run("ip", "-n", name, "link", "set", f"t{i}", "name", "eth0")

    def close(self) -> None:
        """Kill every process left in the bed's namespaces and remove them (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for name in reversed(self._made):
            _kill_all_in(name)
        if self._emu is not None:
            try:
                self._emu.stdin.close()
            except OSError:
                pass
            try:
                self._emu.wait(5)
            except subprocess.TimeoutExpired:
                self._emu.kill()
                self._emu.wait(5)
        for name in reversed(self._made):
            _run("ip", "netns", "del", name, check=False)
        self._made.clear()

    def __enter__(self) -> "NetBed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ nodes
    def address(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    @property
    def addresses(self) -> list[str]:
        return [self.address(i) for i in range(self.nodes)]

    def prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program on ``node``."""
        return ["ip", "netns", "exec", self.names[node]]

    def popen(self, node: int, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(node), *argv], **kw)

    def run(self, node: int, argv: list[str], *, timeout: float = 60.0,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(node), *argv], timeout=timeout, **kw)

    def pids(self, node: int) -> list[int]:
        """Every process of ``node`` (this process is never one: its main thread stays home)."""
        return _pids_in(self.names[node])

    def kill_node(self, node: int, *, power_off: bool = False, at=None) -> list[int]:
        """SIGKILL every process of ``node`` at once; returns their pids. ``power_off``: cut
        the link first, so the peers get no FIN or RST (a machine that lost power). ``at()``
        is called at the moment of the failure (before the cut, or between listing the
        node's processes and the first kill), for whoever times it."""
        if power_off:
            if at is not None:
                at()
            self.set_link(node, up=False)
            return _kill_all_in(self.names[node])
        pids = self.pids(node)
        if at is not None:
            at()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(set(pids) | set(_kill_all_in(self.names[node])))

    @contextlib.contextmanager
    def entered(self, node: int):
        """Run the ``with`` body's thread in ``node``'s network namespace (and every thread it
        starts); the thread goes back home afterwards."""
        home = os.open(f"/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(NETNS_DIR / self.names[node], os.O_RDONLY)
        try:
            _setns(there)
            try:
                yield self
            finally:
                _setns(home)
        finally:
            os.close(there)
            os.close(home)

    # ------------------------------------------------------------------ links
    def set_link(self, node: int, *, up: bool) -> None:
        """Cut (``up=False``) or mend ``node``'s cable: every packet from or to it is dropped
        meanwhile, silently (no error reaches a sender: TCP retransmits)."""
        if self.link == "emulated":
            self._emulator({"node": node, "up": up})
        else:
            _run("ip", "-n", self.switch, "link", "set", f"n{node}", "up" if up else "down")

    def impair(self, node: int, *, delay_ms: float = 0.0, loss: float = 0.0) -> None:
        """As ``tc qdisc replace dev eth0 root netem delay <delay_ms>ms loss <loss*100>%`` on
        ``node``: packets leaving it wait ``delay_ms`` and are dropped with probability
        ``loss``. ``emulated`` beds only."""
        if self.link != "emulated":
            raise NetBedError("impair() needs a bed made with link='emulated' "
                              "(this kernel has no sch_netem)")
        self._emulator({"node": node, "delay_ms": float(delay_ms), "loss": float(loss)})

    def counters(self) -> dict:
        """The emulator's packet counts (forwarded, dropped_loss, dropped_down, other)."""
        if self.link != "emulated":
            return {}
        return json.loads(self._emulator({"op": "counters"}))

    def _emulator(self, cmd: dict) -> str:
        with self._emu_lock:
            if self._emu is None or self._emu.poll() is not None:
                raise NetBedError("the link emulator is not running")
            self._emu.stdin.write(json.dumps(cmd) + "\n")
            self._emu.stdin.flush()
            reply = self._emu.stdout.readline().strip()
        if reply.startswith("error"):
            raise NetBedError(f"link emulator: {reply}")
        return reply


# ---------------------------------------------------------------------- helpers
def _pids_in(name: str) -> list[int]:
    p = _run("ip", "netns", "pids", name, check=False)
    me = os.getpid()
    return [int(x) for x in p.stdout.split() if x.strip().isdigit() and int(x) != me]


def _kill_all_in(name: str) -> list[int]:
    """SIGKILL every process of namespace ``name`` (twice over: one may fork meanwhile)."""
    killed: list[int] = []
    for _ in range(3):
        pids = _pids_in(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cleanup_stale() -> list[str]:
    """Remove the beds of runs whose creator is gone (it was killed before ``close``);
    returns the namespaces removed."""
    if not NETNS_DIR.is_dir():
        return []
    removed = []
    for path in sorted(NETNS_DIR.iterdir()):
        name = path.name
        if not name.startswith(PREFIX):
            continue
        tag = name[len(PREFIX):].split("-", 1)[0]
        try:
            pid = int(tag.split("x", 1)[0], 16)
        except ValueError:
            continue
        if _alive(pid):
            continue
        _kill_all_in(name)
        _run("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed
