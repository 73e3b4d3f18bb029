"""``resilient-ep chaos --engine vllm``: a real ``vllm serve`` with ``--enable-resilience``
(DP=4 + EP, vLLM's defaults otherwise: torch.compile, one API server per DP rank) under seeded
random engine-core and worker kills and pauses, rejoins of lost ranks (the join goes on while
later events land), forged packets and bad inputs, with streaming load from the openai client.
One engine start; bounded. Nothing lost, every answer equal to the failure-free pass, no
membership change from a forged packet, every rejoin started completed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_harness import engine_env

pytestmark = pytest.mark.engine

EVENTS = int(os.environ.get("RESILIENT_EP_CHAOS_VLLM_EVENTS", "10"))
SEED = int(os.environ.get("RESILIENT_EP_CHAOS_SEED", "3"))


def test_vllm_chaos_loses_nothing_and_stays_exact(tiny_model, tmp_path):
    out = tmp_path / "chaos-vllm.json"
    proc = subprocess.run(
        [sys.executable, "-m", "resilient_ep.apps.cli", "chaos", "--engine", "vllm",
         "--events", str(EVENTS), "--seed", str(SEED), "--model", str(tiny_model),
         "--ranks", "4", "--clients", "4", "--prompts", "12", "--hang-timeout-ms", "3000",
         "--json", "--out", str(out), "--time-limit-s", "600"],
        capture_output=True, text=True, timeout=1500, env=engine_env())
    assert out.exists(), (proc.stdout[-2000:], proc.stderr[-4000:])
    r = json.loads(out.read_text())
    detail = _detail(r, proc.stderr)
    assert r["events"] == EVENTS, detail
    assert r["requests"] > 20 and r["requests_lost"] == 0, detail
    assert r["differing"] == 0, detail
    assert r["membership_changes_by_forged"] == 0, detail
    assert r["bad_inputs_refused"] == r["bad_inputs"], detail
    assert sum(v for k, v in r["events_by_kind"].items()
               if k in ("kill", "kill-worker", "stop", "stop-worker")) >= 1, detail
    assert r["rejoins_completed"] == r["rejoins"] and not r["rejoins_unfinished"], detail
    assert proc.returncode == 0, detail


def _detail(r: dict, stderr: str) -> str:
    """The report (less its event log), the events' times from the start of the load and the
    instance's own resilience log lines: what a failure on CI needs, where the files are gone."""
    t0 = r["t_start_monotonic"]
    timeline = [{"s": round(e["t"] - t0, 3), **{k: v for k, v in e.items()
                                                if k in ("kind", "rank", "pause_s", "rejoin_s")}}
                for e in r["event_log"]]
    lines = []
    if "log: " in stderr:
        path = Path(stderr.split("log: ", 1)[1].split()[0])
        if path.exists():
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if "resilient-ep" in ln][-60:]
    return (json.dumps({k: v for k, v in r.items() if k not in ("event_log", "metrics")},
                       indent=1)[:4000]
            + "\nmetrics: " + json.dumps(r.get("metrics"))
            + "\nevents (s from the start of the load): " + json.dumps(timeline)
            + "\nresilience log:\n" + "\n".join(ln[:300] for ln in lines))
