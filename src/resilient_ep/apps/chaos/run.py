"""One chaos run: the failure-free pass, the load, the events, and the report."""

from __future__ import annotations

import random
import time
from collections import Counter

from .events import Chaos
from .load import Load, ask, client, make_workload
from .target import Target

__all__ = ["run_chaos", "summary"]


def run_chaos(target: Target, *, events: int, seed: int, clients: int, prompts: int,
              min_live: int, death_gap_s: float, gap_s: tuple[float, float] = (0.1, 0.8),
              time_limit_s: float = 1800.0, vocab: int, log=print) -> dict:
    target.check(min_live)
    rng = random.Random(seed)
    w = make_workload(random.Random(seed + 1), prompts, vocab,
                      avoid={p for p in (target.poison_prompt() or [])[:1]})
    log(f"failure-free pass: {len(w.prompts)} prompts ...")
    api = client(target)
    for i in range(len(w.prompts)):
        a = ask(api, target.model, w, i, stream=False)
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
        rejoins = target.settle_rejoins(600.0)  # joins still under way end under load
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
        "lost_examples": [{"error": a.error, "stream": a.stream, "prompt": a.prompt,
                           "sent_s": round(a.t0 - t_start, 3),
                           "failed_s": round(a.t1 - t_start, 3)} for a in lost[:5]],
        "equal_to_failure_free": len(done) - len(differing), "differing": len(differing),
        "differing_streamed": sum(1 for a in differing if a.stream),
        "differing_examples": [{"prompt": a.prompt, "stream": a.stream, "got": a.text,
                                "want": w.reference[a.prompt],
                                "sent_s": round(a.t0 - t_start, 3),
                                "answered_s": round(a.t1 - t_start, 3)} for a in differing[:3]],
        "longest_client_stall_s": round(max((a.max_gap_s for a in done if a.stream),
                                            default=0.0), 3),
        "poison_requests": len(chaos.poison),
        "poison_failed_cleanly": sum(1 for e in chaos.poison if e["ok"]),
        "bad_inputs": len(chaos.bad), "bad_inputs_refused": sum(1 for e in chaos.bad if e["ok"]),
        "forged_packets": chaos.forged, "membership_changes_by_forged": chaos.forged_changes,
        "rejoins": sum(1 for e in chaos.events if e["kind"] == "rejoin" and "rejoin_s" in e),
        "rejoins_completed": sum(1 for r in rejoins if r["state"] == "live"),
        "rejoins_unfinished": [r for r in rejoins if r["state"] != "live"],
        "rejoins_given_up": list(getattr(target, "dropped_joins", [])),
        "clients_drained": drained,
        "final": {"epoch": status.get("epoch"),
                  "live": [r["rank"] for r in status.get("ranks", []) if r.get("state") == "live"]},
        "metrics": target.metrics(),
        "event_log": chaos.events,
        "t_start_monotonic": t_start,
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
        f"  rejoins         {r['rejoins']} started, {r['rejoins_completed']} completed"
        + (f", unfinished {r['rejoins_unfinished']}" if r["rejoins_unfinished"] else ""),
        f"  final           epoch {r['final']['epoch']}, live ranks {r['final']['live']}",
        f"  {'OK' if r['ok'] else 'FAILED'}",
    ]
    for e in r["lost_examples"]:
        lines.append(f"  lost: {e}")
    if r["lost_examples"] or r["differing_examples"]:
        t0 = r.get("t_start_monotonic")
        for e in r["event_log"]:
            lines.append(f"  event {e['n']} at {e['t'] - t0:.3f} s: {e['kind']} "
                         f"{e.get('rank', '')}" if t0 else "")
    for d in r["differing_examples"]:
        lines.append(f"  differing: {d}")
    return "\n".join(lines)
