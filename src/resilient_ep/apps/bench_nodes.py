"""``resilient-ep bench failover --nodes 2``: what failures between hosts cost, on the
reference runtime, with the ranks on the "nodes" of a network test bed (root only;
``resilient_ep.netbed``: network namespaces, traffic never leaves them).

(a) steady state across a slow link: decode throughput with 10 ms added each way (20 ms RTT)
    over the same bed without it, alternating, at the default detector timeouts; fences and
    lease expiries counted (a fence here is a false one);
(b) a node lost: every process of node 1 SIGKILLed at once; detection (the dropped
    connections), stall (from the kill until every survivor has completed a step under the
    new epoch), stall beyond detection;
(c) a node powered off: its cable cut, then the same; only the heartbeats can tell (timed
    from just before the ``ip link`` command that cuts it: up to ~10 ms early);
(d) a partition: node 1's cable cut; detection and fence by the front end (heartbeat timeout),
    when the isolated ranks stopped by themselves (lease), the stall; then the cable mended,
    the time until they are taken back.
Every stream of (b)-(d) is compared with the failure-free run of (a); none may be lost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from ..config import ResilienceConfig
from ..runtime.coordinator import Coordinator
from ..runtime.workload import ensure_model, prompts

__all__ = ["run", "main"]

BASE_PORT = 24000
DELAY_MS = 10.0  # each way


def _cfg(bed, args=None) -> ResilienceConfig:
    timeout = getattr(args, "nodes_hang_timeout_ms", None)
    return ResilienceConfig().with_overrides([
        "transport.address=tcp", f"transport.node_addresses=[{', '.join(bed.addresses)}]",
        f"transport.base_port={BASE_PORT}", "placement.redundant_slots_per_rank=2",
        *([f"detector.heartbeat_timeout_ms={timeout}"] if timeout else [])])


def _start(bed, model_dir, ranks: int, cfg) -> Coordinator:
    with bed.entered(0):
        return Coordinator(model_dir, num_ranks=ranks, config=cfg, launcher=bed.prefix).start()


def _serve(c: Coordinator, work, max_tokens: int):
    t0 = time.perf_counter()
    recs = [c.submit(p, max_tokens) for p in work]
    for r in recs:
        r.wait(300)
    dt = time.perf_counter() - t0
    return recs, sum(len(r.generated) for r in recs) / dt


def _wait(cond, timeout: float = 120.0, every: float = 0.002) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(every)
    return True


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ms(x):
    return None if x is None else round(x * 1000.0, 1)


def steady_state(model_dir, args, work, log) -> tuple[dict, list]:
    from ..netbed import NetBed

    with NetBed(args.nodes, link="emulated", seed=args.seed) as bed:
        cfg = _cfg(bed)  # the default timeouts: the claim is about them
        c = _start(bed, model_dir, args.ranks, cfg)
        try:
            _serve(c, work, 4)  # warm up
            fast, slow, reference = [], [], None
            for i in range(args.throughput_runs):
                for delay in ((0.0, DELAY_MS) if i % 2 == 0 else (DELAY_MS, 0.0)):
                    for node in range(bed.nodes):
                        bed.impair(node, delay_ms=delay)
                    recs, tput = _serve(c, work, args.max_tokens)
                    (slow if delay else fast).append(tput)
                    if reference is None and not delay:
                        reference = [list(r.generated) for r in recs]
                log(f"steady state pair {i + 1}: {fast[-1]:.0f} tok/s, with 20 ms RTT "
                    f"{slow[-1]:.0f} tok/s")
            lease = c.status()["hosts"]["lease"]
            out = {"ratio_20ms_rtt": _median(slow) / _median(fast),
                   "tok_s_no_delay": fast, "tok_s_20ms_rtt": slow,
                   "false_fences": len(c.failures),
                   "lease_expiries": sum(int(v.get("expiries", 0)) for v in lease.values()),
                   "link": "emulated (userspace TUN forwarder; this kernel has no sch_netem)"}
        finally:
            c.shutdown()
    return out, reference


def node_loss(model_dir, args, work, reference, *, power_off: bool, log) -> dict:
    from ..netbed import NetBed

    stalls, detects, beyond, lost, differ, kinds, false = [], [], [], 0, 0, [], 0
    for trial in range(args.trials):
        with NetBed(args.nodes) as bed:
            c = _start(bed, model_dir, args.ranks, _cfg(bed, args))
            victims = c.hosts.ranks_of(args.nodes - 1)
            try:
                recs = [c.submit(p, args.max_tokens) for p in work]
                _wait(lambda: sum(len(r.generated) for r in recs) >= len(recs) * 8)
                bed.kill_node(args.nodes - 1, power_off=power_off,
                              at=lambda: c.mark_injected(victims))
                for r in recs:
                    r.wait(300)
                _wait(lambda: {f.rank for f in c.failures} >= set(victims), timeout=30)
                events = [f for f in c.failures if f.rank in victims]
                last = max(events, key=lambda f: f.epoch)
                _wait(lambda: c.recovery_stall(last) is not None, timeout=30)
                stall = c.recovery_stall(last)
                detect = max(f.detected_at - f.injected_at for f in events)
                kinds.append(sorted({f.kind for f in events}))
                false += sum(f.rank not in victims for f in c.failures)
                stalls.append(stall)
                detects.append(detect)
                beyond.append(None if stall is None else stall - detect)
                lost += sum(r.error is not None for r in recs)
                differ += sum(r.generated != ref for r, ref in zip(recs, reference))
                log(f"node {'powered off' if power_off else 'killed'} {trial + 1}: detected "
                    f"{detect * 1000:.0f} ms, stall {stall * 1000 if stall else float('nan'):.0f} ms")
            finally:
                c.shutdown()
    return {"detect_ms": [_ms(x) for x in detects], "stall_ms": [_ms(x) for x in stalls],
            "stall_beyond_detection_ms": [_ms(x) for x in beyond],
            "detect_ms_median": _ms(_median(detects)), "stall_ms_median": _ms(_median(stalls)),
            "stall_beyond_detection_ms_median": _ms(_median(beyond)),
            "detected_as": kinds, "survivors_fenced": false,
            "requests_lost": lost, "streams_differing": differ}


def partition(model_dir, args, work, reference, log) -> dict:
    from ..netbed import NetBed

    out = {k: [] for k in ("detect_ms", "stall_ms", "isolated_stopped_ms", "rejoined_ms")}
    lost = differ = false = 0
    for trial in range(args.trials):
        with NetBed(args.nodes) as bed:
            c = _start(bed, model_dir, args.ranks, _cfg(bed, args))
            node = args.nodes - 1
            victims = c.hosts.ranks_of(node)
            try:
                recs = [c.submit(p, args.max_tokens) for p in work]
                _wait(lambda: sum(len(r.generated) for r in recs) >= len(recs) * 8)
                t0 = c.mark_injected(victims)
                bed.set_link(node, up=False)
                for r in recs:
                    r.wait(300)
                _wait(lambda: {f.rank for f in c.failures} >= set(victims), timeout=30)
                events = [f for f in c.failures if f.rank in victims]
                last = max(events, key=lambda f: f.epoch)
                _wait(lambda: c.recovery_stall(last) is not None, timeout=30)
                t_up = time.time()
                bed.set_link(node, up=True)
                state = lambda: [c.status()["ranks"][r]["state"] for r in victims]  # noqa: E731
                back = _wait(lambda: state() == ["live"] * len(victims), timeout=60, every=0.005)
                rejoined = time.time() - t_up if back else None
                # each isolated rank reports when its lease ran out once it can talk again
                _serve(c, work, 4)
                lease = c.status()["hosts"]["lease"]
                stopped = [lease.get(str(r), {}).get("expired_at") for r in victims]
                out["detect_ms"].append(_ms(max(f.detected_at for f in events) - t0))
                out["stall_ms"].append(_ms(c.recovery_stall(last)))
                out["isolated_stopped_ms"].append(
                    _ms(max(stopped) - t0) if all(s is not None for s in stopped) else None)
                out["rejoined_ms"].append(_ms(rejoined))
                false += sum(f.rank not in victims for f in c.failures)
                lost += sum(r.error is not None for r in recs)
                differ += sum(r.generated != ref for r, ref in zip(recs, reference))
                log(f"partition {trial + 1}: fenced after {out['detect_ms'][-1]} ms, isolated "
                    f"ranks stopped after {out['isolated_stopped_ms'][-1]} ms, taken back "
                    f"{out['rejoined_ms'][-1]} ms after the cable was mended")
            finally:
                c.shutdown()
    res = {f"{k}_median": _median(v) for k, v in out.items()}
    res.update(out)
    res.update(requests_lost=lost, streams_differing=differ, survivors_fenced=false)
    return res


def run(args: argparse.Namespace, log=print) -> dict:
    from ..netbed import netbed_available

    why = netbed_available()
    if why is not None:
        raise ValueError(f"--nodes runs on a network test bed, which {why}")
    if args.nodes != 2:
        raise ValueError(f"--nodes: only 2 is measured (node 1 is the one that fails), got "
                         f"{args.nodes}")
    args.nodes_hang_timeout_ms = getattr(args, "nodes_hang_timeout_ms", None)
    for name, default in (("trials", 3), ("requests", 8), ("max_tokens", 48)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.seed = getattr(args, "seed", 0) or 0
    model_dir = ensure_model(args.model, quiet=args.json)
    work = prompts(args.requests, seed=13)
    import os

    load0 = os.getloadavg()
    steady, reference = steady_state(model_dir, args, work, log)
    d = ResilienceConfig().detector
    timeout = args.nodes_hang_timeout_ms or d.heartbeat_timeout_ms
    out = {
        "engine": "reference", "nodes": args.nodes, "ranks": args.ranks,
        "setup": {"requests": args.requests, "max_tokens": args.max_tokens,
                  "trials": args.trials, "heartbeat_interval_ms": d.heartbeat_interval_ms,
                  "heartbeat_timeout_ms_steady_state": d.heartbeat_timeout_ms,
                  "heartbeat_timeout_ms_failures": timeout, "lease_ms": "= heartbeat timeout",
                  "delay_ms_each_way": DELAY_MS,
                  "placement": "every expert on both nodes (mirror pairs across nodes)",
                  "kv_checkpoint": "peer, copies on the other node first"},
        "steady_state": steady,
        "node_killed": node_loss(model_dir, args, work, reference, power_off=False, log=log),
        "node_powered_off": node_loss(model_dir, args, work, reference, power_off=True, log=log),
        "partition": partition(model_dir, args, work, reference, log),
    }
    out["machine"] = {"cpus": os.cpu_count(), "loadavg_start": load0,
                      "loadavg_end": os.getloadavg(),
                      "note": "a 2-core machine shared with other jobs: a survivor fenced in "
                              "a failure trial is a descheduled rank, not the network"}
    return out


def main(args: argparse.Namespace) -> int:
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    res = run(args, log=log)
    if args.json:
        print(json.dumps(res))
        return 0
    s = res["steady_state"]
    print(f"steady state, 20 ms RTT / none   {s['ratio_20ms_rtt']:.3f} "
          f"({s['false_fences']} false fences, {s['lease_expiries']} lease expiries)")
    for key, what in (("node_killed", "node killed"), ("node_powered_off", "node powered off")):
        x = res[key]
        print(f"{what:<32} detected {x['detect_ms_median']} ms, stall {x['stall_ms_median']} ms, "
              f"{x['stall_beyond_detection_ms_median']} ms beyond detection; "
              f"{x['requests_lost']} lost, {x['streams_differing']} differing")
    p = res["partition"]
    print(f"{'partition':<32} fenced after {p['detect_ms_median']} ms, isolated ranks stopped "
          f"after {p['isolated_stopped_ms_median']} ms, taken back {p['rejoined_ms_median']} ms "
          f"after the cable came back; {p['requests_lost']} lost, {p['streams_differing']} differing")
    return 0
