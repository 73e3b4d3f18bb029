"""What the engine adapters share (``resilient_ep.engines.common``) and the core's lost-peer
test, without an engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from resilient_ep.engines.common import launch, patching, procs
from resilient_ep.transport.group import PEER_LOST_MARK, PeerLost, is_peer_lost


def test_is_peer_lost_through_causes_and_text():
    assert is_peer_lost(PeerLost("g", [1], 1))
    try:
        try:
            raise PeerLost("g", [1], 1)
        except PeerLost as e:
            raise RuntimeError("step failed") from e
    except RuntimeError as wrapped:
        assert is_peer_lost(wrapped)
    assert is_peer_lost(RuntimeError(f"worker said: {PEER_LOST_MARK}: group 'x' lost rank(s)"))
    assert not is_peer_lost(RuntimeError("something else")) and not is_peer_lost(None)


def test_when_imported_runs_after_the_first_import(tmp_path, monkeypatch):
    (tmp_path / "rep_common_target.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    patching.when_imported("rep_common_target",
                           lambda: seen.append(sys.modules["rep_common_target"].VALUE))
    assert seen == []
    import rep_common_target  # noqa: F401

    assert seen == [7]
    patching.when_imported("rep_common_target", lambda: seen.append(8))  # loaded: at once
    assert seen == [7, 8]


def test_mark_and_signature_checks():
    def f(a, b):
        return a + b

    def g(a, b):
        return f(a, b)

    patching.mark(g, "x-entry", f)
    assert patching.is_marked(g, "x-entry") and not patching.is_marked(f)
    patching.expect_signature("x-entry", g, ("a", "b"))  # checks the wrapped one
    with pytest.raises(patching.PatchError, match="x-entry"):
        patching.expect_signature("x-entry", f, ("a",))


def test_strip_engine_and_flag_value():
    assert launch.strip_engine(["m", "--engine", "sglang", "--x", "1", "--engine=sglang"],
                               "sglang") == ["m", "--x", "1"]
    with pytest.raises(SystemExit, match="runs vllm, not sglang"):
        launch.strip_engine(["--engine", "sglang"], "vllm")
    assert launch.flag_value(["--tp", "2", "--tp=4"], ("--tp",)) == "4"
    assert launch.cpu_thread_binding(2, [0, 1, 2, 3]) == "0-1|2-3"


def test_pid_state_and_kill_group():
    assert procs.pid_state(os.getpid()) == "live"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)
    assert procs.pid_state(p.pid) == "live"
    procs.kill_group(p, grace_s=5)
    assert p.poll() is not None and procs.pid_state(p.pid) == "dead"
    port = procs.free_port()
    assert 0 < port < 65536
