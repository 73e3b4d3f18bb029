"""Fencing a rank that still runs (no engine start): every process of it says where it is
(the kernel's view, then each thread's Python stack through faulthandler on SIGUSR1) and is
then killed, children first; a SIGSTOPped one is not asked (it cannot answer) and is killed
all the same."""

from __future__ import annotations

import logging
import subprocess
import sys

from resilient_ep.engines.vllm.fencing import RankProcesses

CHILD = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
def somewhere_recognisable():
    print("up", flush=True)
    while True:
        time.sleep(0.01)
somewhere_recognisable()
"""


class _Proc:  # what RankProcesses keeps of a multiprocessing.Process
    def __init__(self, popen):
        self.pid, self.name, self.exitcode = popen.pid, "EngineCore_DP1", None


def _start(stderr):
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=stderr,
                         text=True)
    assert p.stdout.readline().strip() == "up"
    return p


def test_a_fenced_running_rank_logs_its_stacks_and_kernel_state_then_dies(tmp_path, caplog):
    err = open(tmp_path / "stderr", "w")
    running, stopped = _start(err), _start(err)
    stopped.send_signal(19)  # SIGSTOP
    try:
        for victim in (running, stopped):
            ranks = RankProcesses([_Proc(victim)])
            with caplog.at_level(logging.WARNING):
                ranks.fence(1, "stopped answering")
            victim.wait(timeout=10)
            assert victim.returncode == -9
        err.flush()
        dump = (tmp_path / "stderr").read_text()
        assert dump.count("somewhere_recognisable") == 1, dump  # the running one only
        states = [r.getMessage() for r in caplog.records if "fenced process" in r.getMessage()]
        assert len(states) == 2 and "stopped" in states[1], states
        assert all(f"pid {p.pid} " in s for p, s in zip((running, stopped), states))
    finally:
        for p in (running, stopped):
            if p.poll() is None:
                p.kill()
        err.close()
