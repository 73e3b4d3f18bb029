"""``resilient-ep chaos``: random failures under streaming load from a real OpenAI client,
and a report that says whether anything was lost.

One run:

1. an instance starts behind its OpenAI-compatible server (the reference runtime here, vLLM
   with ``--engine vllm``: ``engines/vllm/chaos.py``);
2. a failure-free pass answers every prompt of a seeded workload (text prompts and token-id
   prompts of random lengths, random ``max_tokens``): the outputs every later answer must equal;
3. clients (the ``openai`` package, streaming and not) send those prompts without pause, while
   ``--events`` random events are drawn (seeded) at random moments, each only when the instance
   can take it (at least ``min_live`` ranks stay live, rank deaths are ``--death-gap-s`` apart):

   ==============  ==========================================================================
   ``kill``        SIGKILL a live rank (a crash)
   ``stop``        SIGSTOP a live rank, SIGCONT it after a random pause, shorter or longer than
                   the hang timeout (a pause that is waited out, or a hang that is fenced and
                   taken back)
   ``pause``       SIGSTOP a live rank for well under the hang timeout (nobody is lost: the
                   others wait), drawn even when no rank may die
   ``kill-worker`` / ``stop-worker`` / ``pause-worker``  the same on one worker process
                   (engines that have them)
   ``rejoin``      a lost rank comes back without a restart (engines that support it)
   ``forge``       a burst of forged packets at the instance's sockets (garbage, truncated
                   frames, well-formed messages signed with a wrong key that would declare a
                   live rank dead or a dead one alive): the membership must not change
   ``poison``      a request that kills every rank it runs on (an injected fault): it must fail
                   with a clear error at ``recovery.max_request_failures`` deaths
   ``bad-input``   a request the API must refuse (400 naming the field) before a rank sees it
   ==============  ==========================================================================

4. the load stops; every answer is compared with the failure-free pass.

The report (``--json``: JSON on stdout) counts events, requests, requests lost (errors and
time-outs of ordinary requests), completions equal to the failure-free run, the longest stall a
client saw between two tokens, poison requests failed cleanly, bad inputs refused and
membership changes caused by forged packets. Exit status 0 when nothing was lost, every answer
was exact, every poison request and bad input was handled and no forged packet changed anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main", "run_chaos", "Target", "ReferenceTarget", "forge_packets"]

WORDS = ("the cat sat on a warm mat while rain fell over quiet hills and old roads "
         "wind carried songs from distant towns where people gathered near bright fires "
         "stories of rivers mountains ships and stars filled every long evening").split()

BAD_INPUTS: list[tuple[dict, str | None]] = [
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "the cat", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "the cat", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "the cat", "max_tokens": 10 ** 9}, "max_tokens"),
    ({"prompt": "the cat", "stream": "false"}, "stream"),
    ({"prompt": "the cat", "temperature": 0.8}, "temperature"),
    ({"prompt": "the cat", "top_p": 0.1}, "top_p"),
    ({"prompt": "the cat", "stop": ["."]}, "stop"),
    ({"prompt": "the cat", "logprobs": 3}, "logprobs"),
    ({"prompt": "the cat", "n": 2}, "n"),
    ({"prompt": "the cat", "frobnicate": 1}, "frobnicate"),
]
"""Request bodies the API must refuse, and the field its 400 must name (None: any 400)."""


class Target:
    """An engine under chaos: its server, its ranks and the faults it can take. Subclasses
    implement what their engine supports; ``kinds`` lists those events."""

    kinds: tuple[str, ...] = ()
    url: str = ""
    model: str = ""
    api_key: str = "chaos"
    num_ranks: int = 0
    hang_timeout_s: float = 1.0
    bad_inputs: list[tuple[dict, str | None]] = BAD_INPUTS

    def live(self) -> list[int]: ...
    def lost(self) -> list[int]: ...
    def epoch(self) -> int: ...
    def rejoinable(self) -> list[int]:
        return self.lost()
    def victims(self) -> list[int]:
        """Live ranks this run may take down now."""
        return self.live()
    def signal_rank(self, rank: int, sig: int, worker: bool = False) -> None: ...
    def rejoin(self, rank: int) -> float: ...
    def forge(self, rng: random.Random, n: int) -> int: ...
    def poison_prompt(self) -> list[int] | None: ...
    def check(self, min_live: int) -> None:
        """Refuse a run whose own settings would make outputs inexact by design."""
    def status(self) -> dict: ...
    def metrics(self) -> dict: ...
    def close(self) -> None: ...


# ============================================================================ the reference
class ReferenceTarget(Target):
    kinds = ("kill", "stop", "rejoin", "forge", "poison", "bad-input")

    def __init__(self, model_dir: Path, *, ranks: int, settings: list[str], hang_timeout_ms: float):
        from ..config import ResilienceConfig
        from ..runtime.coordinator import Coordinator
        from .server import serve_in_thread

        # Two spare slots a rank: with half the ranks lost, every expert still fits, so a
        # repair can always bring back what a loss uncovered (outputs stay exact).
        cfg = ResilienceConfig().with_overrides(
            [f"detector.heartbeat_timeout_ms={hang_timeout_ms}",
             "placement.redundant_slots_per_rank=2", *settings])
        self.model_dir = Path(model_dir)
        self.vocab = int(json.loads((self.model_dir / "config.json").read_text())["vocab_size"])
        self._poison = self.vocab - 1
        self.coord = Coordinator(model_dir, num_ranks=ranks, config=cfg,
                                 poison_token=self._poison).start()
        self.server = None
        try:
            self.server = serve_in_thread(self.coord, model_dir, "chaos", api_key=self.api_key)
        except BaseException:
            self.coord.shutdown()
            raise
        self.url, self.model, self.num_ranks = self.server.url, "chaos", ranks
        self.hang_timeout_s = hang_timeout_ms / 1000.0
        self.slots_per_rank, self.num_experts = self.coord.slots_per_rank, self.coord.num_experts

    def check(self, min_live: int) -> None:
        if min_live * self.slots_per_rank < self.num_experts:
            raise ValueError(
                f"min-live: {min_live} ranks of {self.slots_per_rank} expert slots cannot hold "
                f"all {self.num_experts} experts, and outputs past that point degrade by design; "
                "raise --min-live or placement.redundant_slots_per_rank")

    def live(self) -> list[int]:
        return list(self.coord.membership.view().live_ranks)

    def lost(self) -> list[int]:
        from ..membership import RankState

        return [r for r in range(self.num_ranks)
                if self.coord.membership.state(r) in (RankState.DEAD, RankState.FENCED)]

    def epoch(self) -> int:
        return self.coord.membership.epoch

    def rejoinable(self) -> list[int]:
        """Dead ranks (a fenced one wakes up and is taken back by the coordinator itself)."""
        from ..membership import RankState

        return [r for r in range(self.num_ranks)
                if self.coord.membership.state(r) is RankState.DEAD]

    def signal_rank(self, rank: int, sig: int, worker: bool = False) -> None:
        if sig == signal.SIGCONT:
            self.coord.ranks.send_signal(rank, sig)
        else:
            self.coord.kill(rank, sig)

    def rejoin(self, rank: int) -> float:
        return self.coord.rejoin(rank, timeout=120)

    def poison_prompt(self) -> list[int]:
        return [self._poison, 5, 6, 7]

    def forge(self, rng: random.Random, n: int) -> int:
        from ..transport.zmq_transport import data_endpoint

        run = self.coord.run_dir
        live, lost = self.live(), self.lost() or [0]
        targets = [f"ipc://{run}/heartbeat"]
        kind = self.coord.config.transport.address
        if kind == "ipc":
            targets += [data_endpoint("ipc", str(run), r) for r in live]
        return forge_packets(rng, n, [(t, "push") for t in targets], live=live, lost=lost)

    def status(self) -> dict:
        return self.coord.status()

    def metrics(self) -> dict:
        m = self.coord.metrics()
        return {"failovers": dict(m.failovers), "stall_s_max": max(m.stall_s, default=None),
                "detection_s_max": max(m.detection_s, default=None),
                "rejected_messages": {f"{c}/{r}": n for (c, r), n in sorted(m.rejected.items())},
                "requests_migrated": m.requests_migrated, "kv_restores": m.kv_restores,
                "restored_tokens": m.restored_tokens, "recomputed_tokens": m.recomputed_tokens,
                "poisoned_requests": m.poisoned_requests}

    def close(self) -> None:
        for r in range(self.num_ranks):  # never leave a stopped rank behind
            try:
                self.coord.ranks.send_signal(r, signal.SIGCONT)
            except Exception:
                pass
        if self.server is not None:
            self.server.stop()
        self.coord.shutdown()


def forge_packets(rng: random.Random, n: int, endpoints: list[tuple[str, str]], *,
                  live: list[int], lost: list[int]) -> int:
    """Send ``n`` forged packets spread over ``endpoints`` (``(address, "push")`` for a
    ZeroMQ PULL socket, ``(address, "dealer")`` for a ROUTER) from a process that does not
    hold the instance's key; returns how many were sent."""
    import zmq

    from ..transport import wire

    ctx = zmq.Context.instance()
    socks = []
    for ep, kind in endpoints:
        s = ctx.socket(zmq.DEALER if kind == "dealer" else zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(ep)
        socks.append(s)
    wrong = os.urandom(32)
    sent = 0
    try:
        time.sleep(0.05)  # let the connections come up
        for i in range(n):
            sock = socks[i % len(socks)]
            choice = rng.randrange(6)
            if choice == 0:  # garbage
                frames = [os.urandom(rng.randrange(1, 200))]
            elif choice == 1:  # a live rank declared dead
                frames = [wire.encode_header({"t": "dead", "rank": rng.choice(live),
                                              "reporter": rng.choice(live)}, key=wrong)]
            elif choice == 2:  # a lost rank declared alive
                frames = [wire.encode_header({"t": "alive", "rank": rng.choice(lost),
                                              "pid": os.getpid()}, key=wrong)]
            elif choice == 3:  # a member's farewell
                frames = [wire.encode_header({"t": "bye", "src": rng.choice(live), "dead": [],
                                              "epoch": 10 ** 6}, key=wrong)]
            elif choice == 4:  # a truncated frame of the right kind
                frames = [wire.encode_header({"t": "alive", "rank": rng.choice(live),
                                              "pid": 1}, key=wrong)[:rng.randrange(1, 12)]]
            else:  # a data message claiming a live source, with a lying tensor spec
                frames = [wire.encode_header(
                    {"t": "dispatch", "src": rng.choice(live), "epoch": 10 ** 6,
                     "dead": list(lost), "tensors": [["torch.float32", [4, 1 << 20]]]},
                    key=wrong), os.urandom(64)]
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
                sent += 1
            except zmq.ZMQError:
                pass
        time.sleep(0.05)
    finally:
        for s in socks:
            s.close(linger=0)
    return sent


# ============================================================================ the load
@dataclass
class Answer:
    prompt: int
    stream: bool
    text: str | None = None
    error: str | None = None
    max_gap_s: float = 0.0
    t0: float = 0.0
    t1: float = 0.0


@dataclass
class Workload:
    prompts: list[Any]
    max_tokens: list[int]
    reference: list[str] = field(default_factory=list)


def make_workload(rng: random.Random, n: int, vocab: int, avoid: set[int]) -> Workload:
    prompts, max_tokens = [], []
    for i in range(n):
        if i % 2:
            ids = [rng.randrange(5, vocab - 1) for _ in range(rng.randrange(1, 200))]
            while ids[0] in avoid:
                ids[0] = rng.randrange(5, vocab - 1)
            prompts.append(ids)
        else:
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 60))))
        max_tokens.append(rng.randrange(4, 48))
    return Workload(prompts, max_tokens)


def _client(target: Target, timeout: float = 180.0):
    import openai

    return openai.OpenAI(base_url=target.url + "/v1", api_key=target.api_key, max_retries=0,
                         timeout=timeout)


def ask(client, model: str, w: Workload, i: int, stream: bool) -> Answer:
    a = Answer(i, stream, t0=time.monotonic())
    try:
        if stream:
            parts, last = [], time.monotonic()
            for chunk in client.completions.create(model=model, prompt=w.prompts[i],
                                                   max_tokens=w.max_tokens[i], stream=True,
                                                   temperature=0):
                now = time.monotonic()
                a.max_gap_s = max(a.max_gap_s, now - last)
                last = now
                c = chunk.choices[0]
                if c.finish_reason == "error" or getattr(chunk, "error", None):
                    raise RuntimeError(f"stream ended with an error: {getattr(chunk, 'error', None)}")
                parts.append(c.text or "")
            a.text = "".join(parts)
        else:
            out = client.completions.create(model=model, prompt=w.prompts[i],
                                            max_tokens=w.max_tokens[i], temperature=0)
            a.text = out.choices[0].text
    except Exception as e:  # every way a request can be lost
        a.error = f"{type(e).__name__}: {str(e)[:300]}"
    a.t1 = time.monotonic()
    return a


class Load:
    """``clients`` threads sending the workload's prompts without pause until stopped."""

    def __init__(self, target: Target, w: Workload, clients: int, seed: int):
        self.target, self.w = target, w
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(random.Random(seed * 1000 + k),),
                                         daemon=True, name=f"chaos-client-{k}")
                        for k in range(clients)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def _run(self, rng: random.Random) -> None:
        client = _client(self.target)
        while not self._stop.is_set():
            i = rng.randrange(len(self.w.prompts))
            a = ask(client, self.target.model, self.w, i, stream=rng.random() < 0.6)
            with self._lock:
                self.answers.append(a)

    def stop(self, timeout: float = 240.0) -> bool:
        self._stop.set()
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


# ============================================================================ the events
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
        before = (self.t.epoch(), sorted(self.t.live()))
        ev["epoch_before"] = before[0]
        ev["packets"] = sent = self.t.forge(self.rng, 300)
        time.sleep(max(0.3, self.t.hang_timeout_s * 0.5))
        after = (self.t.epoch(), sorted(self.t.live()))
        ev["changed"] = changed = before != after
        self.forged += sent
        self.forged_changes += int(changed)

    def _poison(self, ev) -> None:
        prompt = self.t.poison_prompt()
        self._last_death = time.monotonic()
        client = _client(self.t, timeout=120)
        t0 = time.monotonic()
        try:
            client.completions.create(model=self.t.model, prompt=prompt, max_tokens=8,
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


# ============================================================================ one run
def run_chaos(target: Target, *, events: int, seed: int, clients: int, prompts: int,
              min_live: int, death_gap_s: float, gap_s: tuple[float, float] = (0.1, 0.8),
              time_limit_s: float = 1800.0, vocab: int, log=print) -> dict:
    target.check(min_live)
    rng = random.Random(seed)
    w = make_workload(random.Random(seed + 1), prompts, vocab,
                      avoid={p for p in (target.poison_prompt() or [])[:1]})
    log(f"failure-free pass: {len(w.prompts)} prompts ...")
    client = _client(target)
    for i in range(len(w.prompts)):
        a = ask(client, target.model, w, i, stream=False)
        if a.error:
            raise RuntimeError(f"the failure-free pass failed on prompt {i}: {a.error}")
        w.reference.append(a.text)
    log(f"chaos: {events} events, {clients} clients, seed {seed} ...")
    load = Load(target, w, clients, seed).start()
    chaos = Chaos(target, rng, min_live=min_live, death_gap_s=death_gap_s, log=log)
    t_start = time.monotonic()
    try:
        for n in range(events):
            if time.monotonic() - t_start > time_limit_s:
                log(f"time limit ({time_limit_s} s) reached after {n} events")
                break
            time.sleep(rng.uniform(*gap_s))
            chaos.run_one(n)
        chaos.finish()
        time.sleep(1.0)  # what is in flight lands
    finally:
        chaos.finish()
        drained = load.stop()
    duration = time.monotonic() - t_start
    answers = list(load.answers)
    lost = [a for a in answers if a.error]
    done = [a for a in answers if not a.error]
    differing = [a for a in done if a.text != w.reference[a.prompt]]
    kinds = Counter(e["kind"] for e in chaos.events)
    status = target.status()
    report = {
        "engine": type(target).__name__.replace("Target", "").lower(), "seed": seed,
        "events": len(chaos.events), "events_by_kind": dict(sorted(kinds.items())),
        "duration_s": round(duration, 1), "clients": clients, "prompts": len(w.prompts),
        "requests": len(answers), "requests_lost": len(lost),
        "lost_examples": [a.error for a in lost[:5]],
        "equal_to_failure_free": len(done) - len(differing), "differing": len(differing),
        "differing_streamed": sum(1 for a in differing if a.stream),
        "differing_examples": [{"prompt": a.prompt, "stream": a.stream, "got": a.text,
                                "want": w.reference[a.prompt]} for a in differing[:3]],
        "longest_client_stall_s": round(max((a.max_gap_s for a in done if a.stream),
                                            default=0.0), 3),
        "poison_requests": len(chaos.poison),
        "poison_failed_cleanly": sum(1 for e in chaos.poison if e["ok"]),
        "bad_inputs": len(chaos.bad), "bad_inputs_refused": sum(1 for e in chaos.bad if e["ok"]),
        "forged_packets": chaos.forged, "membership_changes_by_forged": chaos.forged_changes,
        "rejoins": sum(1 for e in chaos.events if e["kind"] == "rejoin" and "rejoin_s" in e),
        "clients_drained": drained,
        "final": {"epoch": status.get("epoch"),
                  "live": [r["rank"] for r in status.get("ranks", []) if r.get("state") == "live"]},
        "metrics": target.metrics(),
        "event_log": chaos.events,
    }
    report["ok"] = bool(
        report["requests"] > 0 and not lost and not differing and drained
        and report["poison_failed_cleanly"] == report["poison_requests"]
        and report["bad_inputs_refused"] == report["bad_inputs"]
        and report["membership_changes_by_forged"] == 0)
    return report


def summary(r: dict) -> str:
    m = r.get("metrics", {})
    lines = [
        f"chaos on {r['engine']}: {r['events']} events in {r['duration_s']} s "
        f"({', '.join(f'{k} {v}' for k, v in r['events_by_kind'].items())})",
        f"  requests        {r['requests']} answered, {r['requests_lost']} lost, "
        f"{r['equal_to_failure_free']} equal to the failure-free run, {r['differing']} differing",
        f"  longest stall   {r['longest_client_stall_s']} s between two tokens of a stream"
        + (f"; recovery stalls up to {m['stall_s_max']:.3f} s" if m.get("stall_s_max") else ""),
        f"  poison          {r['poison_failed_cleanly']}/{r['poison_requests']} failed cleanly; "
        f"bad inputs {r['bad_inputs_refused']}/{r['bad_inputs']} refused with a 400 naming the field",
        f"  forged packets  {r['forged_packets']} sent, {r['membership_changes_by_forged']} "
        "membership changes",
        f"  final           epoch {r['final']['epoch']}, live ranks {r['final']['live']}",
        f"  {'OK' if r['ok'] else 'FAILED'}",
    ]
    for e in r["lost_examples"]:
        lines.append(f"  lost: {e}")
    for d in r["differing_examples"]:
        lines.append(f"  differing: {d}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("reference", "vllm"), default="reference")
    p.add_argument("--events", type=int, default=100, help="random events (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--model", help="checkpoint directory (default: the tiny model, built once)")
    p.add_argument("--ranks", type=int, default=None,
                   help="ranks (reference: 4; vllm: DP ranks, 4)")
    p.add_argument("--clients", type=int, default=6, help="concurrent OpenAI clients")
    p.add_argument("--prompts", type=int, default=24, help="prompts in the workload")
    p.add_argument("--min-live", type=int, default=2, help="never fewer live ranks than this")
    p.add_argument("--death-gap-s", type=float, default=3.0,
                   help="at least this long between two rank deaths")
    p.add_argument("--hang-timeout-ms", type=float, default=1000.0,
                   help="detector.heartbeat_timeout_ms of the instance")
    p.add_argument("--time-limit-s", type=float, default=1800.0, help="stop drawing events after")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a resilience configuration field")
    p.add_argument("--enforce-eager", action="store_true",
                   help="vllm: pass --enforce-eager (default: vLLM's default, torch.compile)")


def main(args: argparse.Namespace) -> int:
    from ..runtime.workload import ensure_model

    log = (lambda *a, **k: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a, **k: print(*a, flush=True))
    if args.events < 0:
        raise ValueError(f"events must be >= 0, got {args.events}")
    model = ensure_model(args.model, quiet=args.json)
    if args.engine == "vllm":
        from .chaos_vllm import VllmTarget

        work = Path(tempfile.mkdtemp(prefix="rep-chaos-"))
        target = VllmTarget(model, dp=args.ranks or 4, work=work, settings=args.set,
                            hang_timeout_ms=args.hang_timeout_ms, log=log,
                            compile=not args.enforce_eager)
    else:
        target = ReferenceTarget(model, ranks=args.ranks or 4, settings=args.set,
                                 hang_timeout_ms=args.hang_timeout_ms)
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    try:
        report = run_chaos(target, events=args.events, seed=args.seed, clients=args.clients,
                           prompts=args.prompts, min_live=args.min_live,
                           death_gap_s=args.death_gap_s, time_limit_s=args.time_limit_s,
                           vocab=vocab, log=log)
    finally:
        target.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(summary(report))
    return 0 if report["ok"] else 1
