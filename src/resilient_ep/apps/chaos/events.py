"""The chaos run's events: drawn at random (seeded) among those the instance can take now,
each done and recorded (:class:`Chaos`)."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from .load import client
from .target import Target

__all__ = ["Chaos"]


class Chaos:
    def __init__(self, target: Target, rng: random.Random, *, min_live: int,
                 death_gap_s: float, log=print):
        self.t, self.rng, self.min_live, self.death_gap_s = target, rng, min_live, death_gap_s
        self.log = log
        self.events: list[dict] = []
        self._last_death = -1e9
        self._stopped: dict[int, threading.Timer] = {}
        self.poison: list[dict] = []
        self.bad: list[dict] = []
        self.forged = 0
        self.forged_changes = 0

    def feasible(self) -> dict[str, float]:
        t, live = self.t, self.t.live()
        now = time.monotonic()
        can_die = (len(live) > self.min_live and now - self._last_death >= self.death_gap_s
                   and not self._stopped and bool(t.victims()))
        w: dict[str, float] = {"forge": 2, "bad-input": 2}
        if live and not self._stopped:  # a pause well inside the hang timeout: nobody dies
            w["pause"] = 1.5
            if "kill-worker" in t.kinds:
                w["pause-worker"] = 1
        if can_die:
            w.update({"kill": 3, "stop": 2})
            if "kill-worker" in t.kinds:
                w.update({"kill-worker": 3, "stop-worker": 1})
        if "rejoin" in t.kinds and self._rejoinable():
            w["rejoin"] = 5
        if ("poison" in t.kinds and can_die and len(live) == t.num_ranks
                and t.num_ranks - 2 >= self.min_live):
            w["poison"] = 1.5
        return {k: v for k, v in w.items()
                if k in t.kinds or (k.startswith("pause") and "stop" in t.kinds)}

    def _rejoinable(self) -> list[int]:
        """Lost ranks a rejoin may replace: not one paused now (it may still wake up and be
        taken back by the instance itself)."""
        return [r for r in self.t.rejoinable() if r not in self._stopped]

    def run_one(self, n: int) -> dict:
        w = self.feasible()
        kind = self.rng.choices(list(w), weights=list(w.values()))[0]
        ev: dict[str, Any] = {"n": n, "kind": kind, "t": round(time.monotonic(), 3),
                              "epoch_before": self.t.epoch()}
        getattr(self, "_" + kind.replace("-", "_"))(ev)
        ev["epoch_after"] = self.t.epoch()
        self.events.append(ev)
        self.log(f"  event {n:3d}: {kind:<11s} {json.dumps({k: v for k, v in ev.items() if k not in ('n', 'kind', 't')})}")
        return ev

    def _victim(self) -> int:
        return self.rng.choice(self.t.victims())

    def _kill(self, ev, worker: bool = False) -> None:
        ev["rank"] = r = self._victim()
        self._last_death = time.monotonic()
        self.t.signal_rank(r, signal.SIGKILL, worker=worker)

    def _kill_worker(self, ev) -> None:
        self._kill(ev, worker=True)

    def _stop(self, ev, worker: bool = False, short: bool = False) -> None:
        if short:  # any live rank; SIGCONT well before the hang timeout
            ev["rank"] = r = self.rng.choice(self.t.live())
            pause = self.rng.uniform(0.1, 0.5) * self.t.hang_timeout_s
        else:  # may outlast the timeout: a hang, fenced
            ev["rank"] = r = self._victim()
            pause = self.rng.uniform(0.2, 2.5) * self.t.hang_timeout_s
            self._last_death = time.monotonic()
        ev["pause_s"] = round(pause, 3)
        self.t.signal_rank(r, signal.SIGSTOP, worker=worker)

        def cont():
            self.t.signal_rank(r, signal.SIGCONT, worker=worker)
            self._stopped.pop(r, None)

        timer = threading.Timer(pause, cont)
        timer.daemon = True
        self._stopped[r] = timer
        timer.start()

    def _stop_worker(self, ev) -> None:
        self._stop(ev, worker=True)

    def _pause(self, ev) -> None:
        self._stop(ev, short=True)

    def _pause_worker(self, ev) -> None:
        self._stop(ev, worker=True, short=True)

    def _rejoin(self, ev) -> None:
        ev["rank"] = r = self.rng.choice(self._rejoinable())
        try:
            ev["rejoin_s"] = round(self.t.rejoin(r), 3)
        except (RuntimeError, TimeoutError, ValueError) as e:  # taken back meanwhile: fine
            ev["rejoin_error"] = str(e)[:200]

    def _quiescent(self, timeout_s: float = 15.0) -> None:
        """Wait for pending pauses to end and the membership to settle, so that a change
        during a forged burst can only come from the burst."""
        end = time.monotonic() + timeout_s
        while self._stopped and time.monotonic() < end:
            time.sleep(0.05)
        settle = self.t.hang_timeout_s + 0.5
        epoch, since = self.t.epoch(), time.monotonic()
        while time.monotonic() - since < settle and time.monotonic() < end:
            time.sleep(0.05)
            if self.t.epoch() != epoch:
                epoch, since = self.t.epoch(), time.monotonic()

    def _forge(self, ev) -> None:
        self._quiescent()
        joining = set(getattr(self.t, "joining", ()))  # rejoins under way may land meanwhile
        before = self.t.membership_now()
        ev["epoch_before"] = before[0]
        ev["packets"] = sent = self.t.forge(self.rng, 300)
        time.sleep(max(0.3, self.t.hang_timeout_s * 0.5))
        after = self.t.membership_now()
        joined = after[1] - before[1]
        # a change is a rank lost, a rank taken in that was not joining, or an epoch moved
        # by anything but those joins
        ev["changed"] = changed = bool(before[1] - after[1] or joined - joining
                                       or after[0] - before[0] != len(joined))
        if joined or changed:
            ev["joined_meanwhile"] = sorted(joined)
            ev["joining_before"] = sorted(joining)
            ev["live_before_after"] = [sorted(before[1]), sorted(after[1])]
        self.forged += sent
        self.forged_changes += int(changed)

    def _poison(self, ev) -> None:
        prompt = self.t.poison_prompt()
        self._last_death = time.monotonic()
        api = client(self.t, timeout=120)
        t0 = time.monotonic()
        try:
            api.completions.create(model=self.t.model, prompt=prompt, max_tokens=8,
                                      temperature=0)
            ev["outcome"], ok = "answered (the poison did not kill its rank)", False
        except Exception as e:
            msg = str(e)
            ok = "max_request_failures" in msg
            ev["outcome"] = f"{type(e).__name__}: {msg[:160]}"
        ev["ok"], ev["seconds"] = ok, round(time.monotonic() - t0, 3)
        self._last_death = time.monotonic()
        self.poison.append(ev)

    def _bad_input(self, ev) -> None:
        body, param = self.rng.choice(self.t.bad_inputs)
        req = urllib.request.Request(self.t.url + "/v1/completions",
                                     data=json.dumps({"model": self.t.model, **body}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.t.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                code, got = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            code, got = e.code, json.loads(e.read() or b"{}")
        err = got.get("error") or {}
        ev["body"], ev["status"], ev["param"] = body, code, err.get("param")
        ev["ok"] = code == 400 and bool(err.get("message")) and (
            param is None or err.get("param") == param)
        self.bad.append(ev)

    def finish(self) -> None:
        for r, timer in list(self._stopped.items()):
            timer.cancel()
            self.t.signal_rank(r, signal.SIGCONT)
        self._stopped.clear()
