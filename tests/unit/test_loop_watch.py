"""The event-loop watch of the API servers: a loop held by a blocking call is logged once,
with the blocking call's stack, and the stall's length is kept when the loop runs again."""

import asyncio
import logging
import time

import pytest

from resilient_ep.engines.common.loop_watch import LoopWatch


def _hold_the_loop(seconds):
    time.sleep(seconds)


def test_a_held_loop_is_logged_with_the_code_that_holds_it(caplog):
    caplog.set_level(logging.WARNING)

    async def main():
        watch = LoopWatch(asyncio.get_running_loop(), name="test", stall_s=0.3,
                          tick_s=0.05).start()
        await asyncio.sleep(0.2)
        _hold_the_loop(0.8)
        await asyncio.sleep(0.3)
        watch.stop()
        return watch

    watch = asyncio.run(main())
    assert len(watch.stalls) == 1, watch.stalls
    stall = watch.stalls[0]
    assert 0.7 < stall["s"] < 2.0, stall["s"]
    assert any("_hold_the_loop" in line for line in stall["stack"]), stall["stack"]
    held = [r for r in caplog.records if "has run nothing" in r.getMessage()]
    assert len(held) == 1 and "_hold_the_loop" in held[0].getMessage()
    assert any("ran again after" in r.getMessage() for r in caplog.records)


def test_a_busy_but_running_loop_is_not_a_stall():
    async def main():
        watch = LoopWatch(asyncio.get_running_loop(), name="test", stall_s=0.3,
                          tick_s=0.05).start()
        end = time.monotonic() + 0.8
        while time.monotonic() < end:  # many short callbacks: the loop keeps turning
            time.sleep(0.02)
            await asyncio.sleep(0)
        watch.stop()
        return watch

    assert asyncio.run(main()).stalls == []


def test_bad_settings_name_both_values():
    with pytest.raises(ValueError, match=r"stall_s=0.1, tick_s=0.2"):
        LoopWatch(asyncio.new_event_loop(), name="x", stall_s=0.1, tick_s=0.2)
