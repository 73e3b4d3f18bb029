"""LiveGroup over real processes: SIGKILL one member mid-collective, SIGSTOP another; the
survivors raise PeerLost once (strict), agree on the epoch and keep exchanging."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from resilient_ep.config import DetectorConfig
from resilient_ep.transport.group import LiveGroup, PeerLost

ROUNDS = 400


def _member(rank: int, endpoints: list[str], strict: bool, timeout_ms: float, out,
            done) -> None:
    group = LiveGroup("t", rank, endpoints, detector=DetectorConfig(
        heartbeat_interval_ms=20, heartbeat_timeout_ms=timeout_ms))
    lost, sums, live_seen = [], [], []
    try:
        for i in range(ROUNDS):
            try:
                got = group.allgather([torch.tensor([rank + 1, i])], strict=strict)
            except PeerLost as e:
                lost.append((i, sorted(e.dead), e.epoch))
                continue
            if i == 0:
                out.put(("ready", rank))
            sums.append(int(sum(t[0][0] for t in got.values())))
            live_seen.append(sorted(got))
            time.sleep(0.005)
        out.put((rank, lost, sums[-1], live_seen[-1], group.epoch,
                 {r: group.cause(r) for r in group.dead}))
        # Leave only once every survivor is through its last round: a member that closes
        # while another still waits in the last collective is a loss to that one (CI-found).
        done.wait(60)
    finally:
        group.close()


def _run(tmp_path, strict: bool, sig: int, timeout_ms: float):
    n = 3
    endpoints = [f"ipc://{tmp_path}/g-{r}" for r in range(n)]
    ctx = mp.get_context("spawn")
    out, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_member, args=(r, endpoints, strict, timeout_ms, out, done))
             for r in range(n)]
    for p in procs:
        p.start()
    try:
        ready = {out.get(timeout=120)[1] for _ in range(n)}  # spawn imports torch: slow
        assert ready == set(range(n))
        time.sleep(0.3)
        os.kill(procs[2].pid, sig)
        results = {}
        for _ in range(2):
            rank, *rest = out.get(timeout=60)
            results[rank] = rest
        return results
    finally:
        done.set()
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


@pytest.mark.parametrize("sig,cause", [(signal.SIGKILL, "crash"), (signal.SIGSTOP, "hang")])
def test_strict_survivors_agree_after_member_lost(tmp_path, sig, cause):
    results = _run(tmp_path, strict=True, sig=sig, timeout_ms=400)
    assert set(results) == {0, 1}
    for rank, (lost, last_sum, live, epoch, causes) in results.items():
        assert len(lost) == 1, lost            # one failed collective, then back in step
        assert lost[0][1:] == ([2], 1)
        assert epoch == 1 and live == [0, 1]
        assert last_sum == 1 + 2                # only the survivors contribute now
    # at least one survivor saw it itself; the other may have been told
    assert cause in {c for *_, causes in results.values() for c in causes.values()}


def test_lenient_never_raises(tmp_path):
    results = _run(tmp_path, strict=False, sig=signal.SIGKILL, timeout_ms=400)
    for rank, (lost, last_sum, live, epoch, causes) in results.items():
        assert lost == [] and epoch == 1 and live == [0, 1] and last_sum == 3


def _tied_member(rank, endpoints, out):
    group = LiveGroup("t", rank, endpoints, detector=DetectorConfig(
        heartbeat_interval_ms=20, heartbeat_timeout_ms=60_000), tied_to_parent=True)
    out.put(("pid", rank, os.getpid()))
    for i in range(100_000):
        group.allgather([torch.tensor([i])], strict=False)
        time.sleep(0.005)


def _parent_of_tied(rank, endpoints, out):
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_tied_member, args=(rank, endpoints, out))
    child.start()
    child.join()


def _watcher(endpoints, out):
    group = LiveGroup("t", 0, endpoints, detector=DetectorConfig(
        heartbeat_interval_ms=20, heartbeat_timeout_ms=60_000))
    out.put(("pid", 0, os.getpid()))
    t_dead = None
    for i in range(100_000):
        group.allgather([torch.tensor([i])], strict=False)
        if group.dead and t_dead is None:
            t_dead = time.monotonic()
            out.put(("dead", sorted(group.dead), group.cause(1), t_dead))
            return
        time.sleep(0.005)


def test_tied_member_leaves_when_its_parent_dies(tmp_path):
    """vLLM's worker outlives its killed engine core by seconds; tied to it, it leaves the
    group at once (no heartbeat timeout: 60 s here) although its own process still runs."""
    endpoints = [f"ipc://{tmp_path}/g-{r}" for r in range(2)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    watcher = ctx.Process(target=_watcher, args=(endpoints, out))
    parent = ctx.Process(target=_parent_of_tied, args=(1, endpoints, out))
    watcher.start()
    parent.start()
    pids = {}
    try:
        for _ in range(2):
            kind, rank, pid = out.get(timeout=120)
            pids[rank] = pid
        time.sleep(1.0)  # some exchanges
        killed_at = time.monotonic()
        os.kill(parent.pid, signal.SIGKILL)
        kind, dead, cause, t_dead = out.get(timeout=30)
        assert dead == [1] and cause == "crash"
        assert t_dead - killed_at < 5.0  # the heartbeat timeout is 60 s
        os.kill(pids[1], 0)  # the member process itself is still alive
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (watcher, parent):
            p.join(timeout=10)
