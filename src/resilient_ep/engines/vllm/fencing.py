"""The processes of vLLM's engine ranks, for the liveness monitor: who they are, and how a rank
is fenced.

A rank is its engine-core process (``EngineCore_DP<r>``) and that process's children (its
workers). vLLM's worker outlives a SIGKILLed engine core by seconds while it cleans up, and
meanwhile the survivors' collectives wait on it; a SIGSTOPped rank would never exit. So a
rank that is lost is fenced whole: every process of it SIGKILLed, children first. The
children are counted once a second (:meth:`RankProcesses.census`) while the rank is alive,
because a dead engine core's children are re-parented and can no longer be found from it.
"""

from __future__ import annotations

import logging
import re
import signal
import time

import psutil

__all__ = ["RankProcesses", "kill_all", "rank_of", "kernel_state", "STACKS_WAIT_S"]

STACKS_WAIT_S = 0.03
"""The wait after asking each live process of a fenced rank for its stacks (SIGUSR1:
faulthandler, set up by ``plugin.register``, writes them from its signal handler even while
the interpreter is stuck), before the next one and before the kill."""

log = logging.getLogger("vllm." + __name__)  # shown by vLLM's log handler


def rank_of(proc, index: int) -> int:
    """The DP rank of an engine-core process (from its name ``EngineCore_DP<r>``)."""
    m = re.search(r"DP(\d+)", getattr(proc, "name", "") or "")
    return int(m.group(1)) if m else index


def kill_all(procs) -> None:
    """SIGKILL each of ``procs`` (psutil processes); those already gone are skipped."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def kernel_state(p) -> str:
    """One process as the kernel sees it: pid, name, command line, state, wait channel and
    (when readable: root) its kernel stack."""
    try:
        head = f"pid {p.pid} {p.name()!r} {' '.join(p.cmdline())[:160]!r} {p.status()}"
    except psutil.Error as e:
        return f"pid {p.pid}: {e!r}"
    for what in ("wchan", "stack"):
        try:
            with open(f"/proc/{p.pid}/{what}") as f:
                text = f.read().strip()
            head += f"; {what}: " + " | ".join(text.splitlines()[:12])
        except OSError:
            pass
    return head


class RankProcesses:
    def __init__(self, procs: list):
        self.by_rank = {rank_of(p, i): p for i, p in enumerate(procs)}
        self._children: dict[int, list[psutil.Process]] = {}

    def census(self) -> None:
        """Record each live engine core's children (its workers)."""
        for rank, proc in self.by_rank.items():
            if proc.exitcode is None:
                try:
                    kids = psutil.Process(proc.pid).children(recursive=True)
                except psutil.Error:
                    continue
                if kids:
                    self._children[rank] = kids

    def children(self, rank: int) -> list[psutil.Process]:
        return list(self._children.get(rank, []))

    def fence(self, rank: int, why: str) -> None:
        """SIGKILL the rank whole: it must never wake up and serve what goes elsewhere."""
        proc = self.by_rank[rank]
        try:
            parent = psutil.Process(proc.pid)
            victims = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            victims = []
        log.warning("resilient-ep: engine core %s (pid %d) %s: fencing it (its threads' "
                    "stacks follow)", proc.name, proc.pid, why)
        for p in victims:  # why it stopped, in the log (a SIGSTOPped one cannot say)
            log.warning("resilient-ep: fenced process %s", kernel_state(p))
            try:
                if p.status() != psutil.STATUS_STOPPED:
                    p.send_signal(signal.SIGUSR1)
                    time.sleep(STACKS_WAIT_S)  # one at a time: dumps do not interleave
            except psutil.Error:
                pass
        kill_all([*self.children(rank), *victims])

    def reap(self, rank: int) -> None:
        """The rank's engine core is gone: its lingering workers go now."""
        kill_all(self.children(rank))
