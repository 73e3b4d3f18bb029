"""The rank processes of one reference-runtime instance: their start specs, spawning
(``python -m resilient_ep.runtime.rank SPEC_JSON``), the wait until every rank reports ready,
signals, and killing them (one that failed, or all at shutdown).

The coordinator owns the sockets and decides *when*; this module only knows the processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from ..transport import wire

__all__ = ["RankProcesses", "RuntimeStartError", "free_port_base"]


class RuntimeStartError(RuntimeError):
    """The ranks did not come up."""


class RankProcesses:
    """One process per rank, ``procs[r]`` / ``pids[r]`` (a rejoined rank's fresh process replaces
    its old one). ``spec_base``: the spec fields every rank gets (set before the first spawn)."""

    def __init__(self, num_ranks: int, run_dir: Path, *, control=None, prefix=None,
                 spec_of=None) -> None:
        self.num_ranks = num_ranks
        self.run_dir = run_dir
        self.spec_base: dict = {}
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self._control = control or (lambda r: f"ipc://{self.run_dir}/control-{r}")
        """``control(rank)``: where the rank's control PAIR binds."""
        self._prefix = prefix or (lambda r: [])
        """``prefix(rank)``: the command prefix that starts it on its node (several hosts)."""
        self._spec_of = spec_of or (lambda r: {})
        """``spec_of(rank)``: spec fields of that rank alone (its liveness endpoints)."""

    def spec(self, rank: int, **extra) -> dict:
        return dict(self.spec_base, rank=rank, control=self._control(rank),
                    **self._spec_of(rank), **extra)

    def spawn(self, rank: int, **extra) -> dict:
        """Start a process for ``rank`` (the next one, or a fresh one in place of an old one).
        Returns its spec; ``spec["control"]`` is where its control PAIR binds."""
        spec = self.spec(rank, **extra)
        p = self._popen(spec, self._prefix(rank))
        if rank == len(self.procs):
            self.procs.append(p)
            self.pids.append(p.pid)
        else:
            self.procs[rank] = p
            self.pids[rank] = p.pid
        return spec

    @staticmethod
    def _popen(spec: dict, prefix: list[str]) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        return subprocess.Popen([*prefix, sys.executable, "-m", "resilient_ep.runtime.rank",
                                 json.dumps(spec)], env=env, stdin=subprocess.DEVNULL)

    def await_ready(self, ctl: list[zmq.Socket], timeout_s: float, *,
                    key: bytes | None = None) -> None:
        """Wait for ``ready`` from every rank on its control socket ``ctl[r]``; kill them all and
        raise :class:`RuntimeStartError` if one exits or ``timeout_s`` passes first."""
        ready: set[int] = set()
        poller = zmq.Poller()
        for s in ctl:
            poller.register(s, zmq.POLLIN)
        end = time.monotonic() + timeout_s
        while len(ready) < self.num_ranks:
            for r, p in enumerate(self.procs):
                if p.poll() is not None:
                    self.kill_all()
                    raise RuntimeStartError(f"rank {r} exited with code {p.returncode} during start")
            if time.monotonic() > end:
                self.kill_all()
                raise RuntimeStartError(f"ranks {sorted(set(range(self.num_ranks)) - ready)} not "
                                        f"ready within {timeout_s} s")
            for s, _ in poller.poll(200):
                try:
                    msg = wire.decode_header(s.recv(), key=key)
                except wire.WireError:
                    continue
                if msg["t"] == "ready":
                    ready.add(msg["rank"])

    def send_signal(self, rank: int, sig: int) -> None:
        os.kill(self.pids[rank], sig)

    def ensure_gone(self, rank: int) -> None:
        """Kill ``rank``'s process if it is still around (a fenced rank may be) and reap it."""
        old = self.procs[rank]
        if old.poll() is None:
            try:
                os.kill(old.pid, signal.SIGCONT)
                old.kill()
            except ProcessLookupError:
                pass
            old.wait(10)

    def wait(self, timeout: float) -> None:
        """Give every process up to ``timeout`` seconds (in all) to exit on its own."""
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.05, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a SIGSTOPped rank must be able to die
                    p.kill()
                except ProcessLookupError:
                    pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def free_port_base(n: int) -> int:
    """A port ``base`` on 127.0.0.1 with ``base + n`` still a valid port (one data port per rank)."""
    import socket
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535:
            return base
    raise RuntimeError("no free port range on 127.0.0.1")
