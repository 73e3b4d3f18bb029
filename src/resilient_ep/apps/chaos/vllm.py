"""``resilient-ep chaos --engine vllm``: the chaos run (``apps/chaos``) against a real
``vllm serve`` with ``--enable-resilience`` (DP ranks + EP, TP=1, the tiny model in fp32).

What it does to vLLM:

- ``kill`` / ``stop``: SIGKILL / SIGSTOP an engine-core process (``stop``: SIGCONT after a
  random pause, shorter or longer than the hang timeout); ``kill-worker`` / ``stop-worker``:
  the same on the rank's worker process alone (the process that holds the accelerator, which
  dies more often than the engine core);
- ``forge``: forged packets at the instance's liveness socket, its engine and worker failover
  groups and its KV peer stores;
- ``bad-input``: bodies vLLM's API must refuse (400) before an engine sees them;
- ``rejoin``: ``POST /resilience/ranks/{rank}/rejoin`` for a lost rank (to whichever API
  server takes it: the launcher runs it). The event only starts it; the replacement loads,
  warms up and joins while the run goes on, so later events (a kill of another rank, a pause)
  land at random points of the join. Once the authority has admitted it, the rank's new
  processes are read from the status and it may be a victim again.

Not done here, and why: ``poison`` (its two rank deaths land where the request policy puts
the request, and vLLM's two-copy ring of experts loses an expert when two neighbouring ranks
are lost: the outputs would degrade by design). Victims are drawn while the survivors' slots
can still hold every expert (the placement's ``repairable_deaths``): a loss that uncovers
experts is repaired while serving.

The operator's view of the membership comes from the instance's own publication (a replica,
``engines/vllm/liveness.membership_replica``), which a stopped engine does not delay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .target import Target, forge_packets

__all__ = ["VllmTarget", "BAD_INPUTS_VLLM"]

BAD_INPUTS_VLLM: list[tuple[dict, str | None]] = [
    ({"prompt": [10 ** 9]}, None),
    ({"prompt": []}, None),
    ({"prompt": {"text": "x"}}, None),
    ({"prompt": "the cat", "max_tokens": -3}, None),
    ({"prompt": "the cat", "max_tokens": 10 ** 9}, None),
    ({"prompt": "the cat", "temperature": -1}, None),
    ({"prompt": "the cat", "top_p": 2.0}, None),
    ({"prompt": "the cat", "n": 0}, None),
]
"""Bodies vLLM refuses with a 400 (its own error body; no field is named there)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmTarget(Target):
    kinds = ("kill", "kill-worker", "stop", "stop-worker", "forge", "bad-input", "rejoin")
    bad_inputs = BAD_INPUTS_VLLM

    def __init__(self, model_dir: Path, *, dp: int, work: Path, settings: list[str],
                 hang_timeout_ms: float, log=print, compile: bool = False,
                 start_timeout_s: float = 900.0):
        from ...engines.vllm.liveness import membership_replica

        if dp < 2:
            raise ValueError(f"ranks: the vLLM chaos run needs >= 2 DP ranks, got {dp}")
        self.model_dir, self.num_ranks = Path(model_dir), dp
        self.model = "chaos"
        self.instance = uuid.uuid4().hex[:12]
        self.hang_timeout_s = hang_timeout_ms / 1000.0
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "resilient_ep.apps.cli", "serve", str(model_dir),
               "--engine", "vllm", "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", self.model, "--api-key", self.api_key,
               "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
               "--seed", "0", "--data-parallel-size", str(dp), "--enable-expert-parallel",
               "--enable-resilience",
               "--additional-config", json.dumps({"resilience": {"instance": self.instance}}),
               "--resilience-set", f"detector.heartbeat_timeout_ms={hang_timeout_ms}"]
        for s in settings:
            cmd += ["--resilience-set", s]
        if not compile:
            cmd.append("--enforce-eager")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "vllm-serve.log"
        self._log = open(self.log_path, "w")
        log(f"starting vllm serve (DP={dp} + EP, {'compiled' if compile else 'eager'}); "
            f"log: {self.log_path}")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self._wait_ready(start_timeout_s)
            st = self.status()
            self.pids = {r["dp_rank"]: (r["engine_pid"], r["pid"]) for r in st["ranks"]}
            # How many rank deaths the placement repairs (the survivors' slots hold every
            # expert): victims are drawn within that.
            self.repairable = int(st.get("experts", {}).get("plan", {}).get(
                "repairable_deaths", 1))
            self.replica = membership_replica(self.instance, dp)
            self.joining: set[int] = set()  # rejoins asked for, not admitted yet
            self.dropped_joins: list[dict] = []  # rejoins the status said had failed
        except BaseException:
            self.close()
            raise
        log(f"vllm ready; ranks (engine core, worker) pids: {self.pids}")

    # ------------------------------------------------------------------ plumbing
    def _request(self, path: str, timeout_s: float = 30.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path,
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}):\n{self._tail()}")
            try:
                if self._request("/health", 2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vllm serve not ready after {timeout_s} s:\n{self._tail()}")

    def _tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    # ------------------------------------------------------------------ the target
    def live(self) -> list[int]:
        return sorted(self.membership_now()[1])

    def lost(self) -> list[int]:
        view = self.replica.membership.view()
        return [r for r in range(self.num_ranks) if not view.is_live(r)]

    def epoch(self) -> int:
        return self.replica.membership.epoch

    def membership_now(self) -> tuple[int, set[int]]:
        if getattr(self, "joining", None):
            self._settle_joins()  # a rank just admitted: its new processes
        view = self.replica.membership.view()
        return view.epoch, set(view.live_ranks)

    def rejoinable(self) -> list[int]:
        self._settle_joins()
        return [r for r in self.lost() if r not in self.joining]

    def rejoin(self, rank: int) -> float:
        """Ask for ``rank``'s replacement (202); the seconds the request took. The join goes
        on in the background (:meth:`_settle_joins` takes it in)."""
        t0 = time.monotonic()
        req = urllib.request.Request(self.url + f"/resilience/ranks/{rank}/rejoin", data=b"",
                                     method="POST",
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                code, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read()
        if code != 202:
            raise RuntimeError(f"rejoin of DP{rank}: {code} {body[:200]!r}")
        self.joining.add(rank)
        return time.monotonic() - t0

    def _settle_joins(self) -> None:
        """Ranks whose join the authority admitted: their new processes, from the status."""
        view = self.replica.membership.view()
        done = {r for r in self.joining if view.is_live(r)}
        failed = set()
        if self.joining - done:
            st = self.status()
            last = {j["rank"]: j for j in st.get("rejoins", [])}
            failed = {r for r in self.joining - done if last.get(r, {}).get("state") == "failed"}
        if done:
            st = self.status()
            for r in st.get("ranks", []):
                if r["dp_rank"] in done and r.get("pid"):
                    self.pids[r["dp_rank"]] = (r["engine_pid"], r["pid"])
        if failed:  # (a rank taken out of the joins by its status, not by the membership)
            self.dropped_joins.extend({"rank": r, "at": round(time.monotonic(), 3),
                                       "record": last.get(r)} for r in sorted(failed))
        self.joining -= done | failed

    def victims(self) -> list[int]:
        """Live ranks whose loss the instance can cover again: while fewer ranks than the
        placement's ``repairable_deaths`` are lost (or joining), any (an expert that loses
        every copy is repaired into the survivors' slots, and tokens that need it wait for
        it); a rank just admitted once its new processes are known."""
        self._settle_joins()
        if len(self.lost()) + 1 > self.repairable:
            return []
        return [r for r in self.live() if r not in self.joining]

    def settle_rejoins(self, timeout_s: float) -> list[dict]:
        end = time.monotonic() + timeout_s
        while self.joining and time.monotonic() < end:
            time.sleep(1.0)
            self._settle_joins()
        # The authority admits a rank before its rejoin reads "live" (the rejoiner checks the
        # switch after the admission), and an API server shows the last rejoins it knows
        # when the launcher is slow to answer: wait until every record has ended.
        while True:
            st = self.status()
            if "error" in st:  # the status did not answer: nothing is known to have ended
                recs = [{"rank": None, "state": "unknown", "error": st["error"]}]
            else:
                recs = [{"rank": r["rank"], "state": r["state"], "error": r.get("error")}
                        for r in st.get("rejoins") or []]
            ended = all(r["state"] in ("live", "failed") for r in recs)
            if (ended and not st.get("rejoins_stale")) or time.monotonic() >= end:
                return recs
            time.sleep(0.5)

    def signal_rank(self, rank: int, sig: int, worker: bool = False) -> None:
        engine, wpid = self.pids[rank]
        try:
            os.kill(wpid if worker else engine, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGCONT:  # a stop of either process: wake both
            try:
                os.kill(engine if worker else wpid, sig)
            except ProcessLookupError:
                pass

    def forge(self, rng: random.Random, n: int) -> int:
        from ...engines.vllm.instance import endpoints
        from ...engines.vllm.liveness import beacon_endpoint

        live = self.live()
        targets = [(beacon_endpoint(self.instance), "push")]
        core = endpoints(self.instance, "core", self.num_ranks)
        workers = endpoints(self.instance, "w0", self.num_ranks)
        targets += [(core[r], "push") for r in live] + [(workers[r], "push") for r in live]
        from ...engines.vllm.instance import instance_dir

        root = instance_dir(self.instance)
        targets += [(f"ipc://{root}/kvstore-{r}", "dealer") for r in live]
        return forge_packets(rng, n, targets, live=live, lost=self.lost() or [0])

    def poison_prompt(self) -> None:
        return None

    def status(self) -> dict:
        code, raw = self._request("/resilience/status", 60)
        if code != 200:
            return {"error": raw[:300].decode(errors="replace")}
        return json.loads(raw)

    def metrics(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        code, raw = self._request("/metrics", 60)
        if code != 200:
            return {"error": f"/metrics answered {code}"}
        out: dict = {}
        for fam in text_string_to_metric_families(raw.decode()):
            if not fam.name.startswith("resilient_ep_"):
                continue
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    continue
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "engine")
                out[s.name[len("resilient_ep_"):] + (f"{{{label}}}" if label else "")] = s.value
        return out

    def close(self) -> None:
        for rank in getattr(self, "pids", {}):
            self.signal_rank(rank, signal.SIGCONT)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
