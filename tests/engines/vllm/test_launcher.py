"""``resilient-ep serve --engine vllm``: environment, arguments, the console-script fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resilient_ep.engines.vllm import launcher

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("workers,cpus,want", [
    pytest.param(1, [0, 1], "0-1", id="one_worker_all_cpus"),
    pytest.param(2, [0, 1], "0|1", id="dp2_two_cpus"),
    pytest.param(4, [0, 1], "0|1|0|1", id="oversubscribed"),
    pytest.param(2, list(range(8)), "0-3|4-7", id="split_eight"),
    pytest.param(3, [0, 1, 2, 3, 4, 5, 6], "0-2|3,4|5,6", id="uneven"),
])
def test_cpu_thread_binding(workers, cpus, want):
    got = launcher.cpu_thread_binding(workers, cpus)
    assert got == want.replace("3,4", "3-4").replace("5,6", "5-6")


def test_parallel_sizes():
    argv = ["m", "--data-parallel-size", "2", "-tp=2", "--enable-expert-parallel"]
    assert launcher.parallel_sizes(argv) == {"dp": 2, "tp": 2, "pp": 1, "dp_local": 2}


def test_prepare_environment_keeps_what_is_set():
    env = {"VLLM_CPU_KVCACHE_SPACE": "4"}
    set_now = launcher.prepare_environment(["m", "-dp", "2"], env=env, cpu_build=True)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and "VLLM_CPU_KVCACHE_SPACE" not in set_now
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert len(env["VLLM_CPU_OMP_THREADS_BIND"].split("|")) == 2
    gpu = {}
    launcher.prepare_environment(["m"], env=gpu, cpu_build=False)
    assert gpu == {"VLLM_HOST_IP": "127.0.0.1"}


def test_serve_argv_loopback_and_engine_flag():
    assert launcher.serve_argv(["m", "--engine", "vllm", "--port", "1"]) == [
        "m", "--port", "1", "--host", "127.0.0.1"]
    assert launcher.serve_argv(["m", "--host", "0.0.0.0"]) == ["m", "--host", "0.0.0.0"]
    with pytest.raises(SystemExit):
        launcher.serve_argv(["m", "--engine", "sglang"])


def test_serve_argv_keeps_vllms_api_server_count():
    base = ["m", "--host", "h", "-dp", "2", "--enable-expert-parallel"]
    # vLLM's own API-server count, resilience on or off (failover follows every API server)
    assert "--api-server-count" not in launcher.serve_argv([*base, "--enable-resilience"])
    assert "--api-server-count" not in launcher.serve_argv(base)
    assert launcher.serve_argv([*base, "--enable-resilience", "--api-server-count", "2"]).count(
        "--api-server-count") == 1  # the user's choice stands


def test_stock_console_script_fails_and_launcher_fixes_it():
    """The quirk the launcher exists for, and its fix (ledger: vllm-cpu-console-version)."""
    vllm_bin = Path(sys.executable).parent / "vllm"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if launcher.is_cpu_build() and vllm_bin.exists():
        stock = subprocess.run([str(vllm_bin), "--version"], capture_output=True, text=True,
                               timeout=180, env=env)
        assert stock.returncode != 0 and "PackageNotFoundError" in stock.stderr
    code = ("import sys; from resilient_ep.engines.vllm.launcher import fix_version_lookup;"
            "fix_version_lookup(); fix_version_lookup();"
            "from vllm.platforms import vllm_version_matches_substr as m;"
            "print('cpu-platform', m('cpu'));"
            "from vllm.entrypoints.cli.main import main; sys.argv = ['vllm', '--version']; main()")
    fixed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=180, env=env)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    if launcher.is_cpu_build():
        assert "cpu-platform True" in fixed.stdout and "0.32.0+cpu" in fixed.stdout


def test_launcher_help_lists_resilience_flags():
    out = subprocess.run([sys.executable, "-m", "resilient_ep.engines.vllm.launcher", "--help=Resilience"],
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--enable-resilience" in out.stdout and "--resilience-config" in out.stdout


def test_conflicting_wheels_detected(monkeypatch):
    versions = {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchaudio": "2.13.0+cpu"}

    def fake_version(name):
        if name not in versions:
            raise launcher.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(launcher.importlib.metadata, "version", fake_version)
    assert launcher.conflicting_wheels() == ["torchvision==0.28.0"]
    versions["torch"] = "2.13.0"  # a CUDA torch: its CUDA companions are fine
    assert launcher.conflicting_wheels() == []


def test_this_venv_has_no_conflicting_wheels():
    assert launcher.conflicting_wheels() == []  # ci/setup-vllm.sh removed them
