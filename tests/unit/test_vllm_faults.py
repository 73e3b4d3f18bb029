"""The failure-model tests' fault trigger (engines/vllm/faults.py), without vLLM: armed
faults count down the victim's steps, fire once, record when, and do what they say."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
import uuid

import pytest

from resilient_ep.engines.vllm import faults


def test_a_raise_fires_at_the_counted_step_and_once():
    instance = uuid.uuid4().hex[:12]
    faults.arm(instance, 1, "raise", after_steps=3)
    faults.maybe_fault(instance, 0)  # another rank's trigger: nothing
    faults.maybe_fault(instance, 1)
    faults.maybe_fault(instance, 1)
    assert faults.fired_at(instance, 1) is None
    before = time.monotonic()
    with pytest.raises(faults.InjectedDeviceError, match="DP1"):
        faults.maybe_fault(instance, 1)
    assert before <= faults.fired_at(instance, 1) <= time.monotonic()
    assert not faults.trigger_path(instance, 1).exists()
    faults.maybe_fault(instance, 1)  # fired once, then gone


def test_bad_arming_is_refused():
    with pytest.raises(ValueError, match="fault action"):
        faults.arm("x", 0, "explode")
    with pytest.raises(ValueError, match="after_steps"):
        faults.arm("x", 0, "kill", after_steps=0)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:  # "pid (comm) S ..."
        return f.read().rsplit(")", 1)[1].split()[0]


def _victim(instance: str) -> None:
    while True:
        faults.maybe_fault(instance, 0)
        time.sleep(0.01)


@pytest.mark.parametrize("action, how", [("kill", -signal.SIGKILL), ("stop", "stopped")])
def test_signals_are_real(action, how):
    instance = uuid.uuid4().hex[:12]
    faults.arm(instance, 0, action, after_steps=5)
    p = mp.get_context("spawn").Process(target=_victim, args=(instance,), daemon=True)
    p.start()
    try:
        if how == "stopped":
            deadline = time.monotonic() + 30
            while _state(p.pid) != "T" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _state(p.pid) == "T"
        else:
            p.join(30)
            assert p.exitcode == how
        assert faults.fired_at(instance, 0) is not None
    finally:
        p.kill()
        p.join(5)
