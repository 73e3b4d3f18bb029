"""One rank process of the reference runtime: attention for its own requests (data parallel,
own KV cache) and a shard of the experts (its slots of the layout), serving other ranks'
dispatches whenever it waits.

Started by the coordinator as ``python -m resilient_ep.runtime.rank SPEC_JSON``. Sockets:
- control: a PAIR bound at ``spec["control"]``; the coordinator connects to it (its socket
  monitor is how a crash is seen) and sends ``add`` / ``membership`` / ``shutdown``; the rank
  sends ``ready`` and per-step ``tokens``;
- liveness: a :class:`~resilient_ep.liveness.Beacon` tells ``spec["heartbeat"]`` (the
  coordinator's liveness socket) every ``detector.heartbeat_interval_ms`` that this rank is
  alive, in the wire format every engine's ranks use (a SIGSTOPped rank goes silent: a hang);
  between hosts a :class:`~resilient_ep.liveness.datagrams.LeaseBeacon` sends the same as
  UDP datagrams to ``spec["udp"]`` and holds the lease the answers renew: without one the
  rank starts no step and emits no token (``detector.lease_ms``: an isolated rank stops by
  itself before the front end moves its requests);
- data: :class:`~resilient_ep.transport.zmq_transport.ZmqTransport` for dispatch/combine.
"""

from __future__ import annotations

import ctypes
from collections import Counter
import json
import os
import signal
import sys
import time
import traceback

import torch
import zmq

from ..layout import ExpertLayout
from ..liveness import Beacon
from ..membership import MembershipView, RankState
from ..routing import RoutingTable
from ..transport import curve, wire
from ..transport.dispatch import MoEExchange, serve_dispatch
from ..transport.zmq_transport import ZmqTransport
from . import batch_invariant
from ..repair import HostBackup
from .model import ExpertBank, MoEModel
from .model.weights import ExpertWeights
from .scheduler import RankRequest, RankScheduler


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the coordinator) exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


FAIL_POINTS = ("dispatch", "combine", "serve", "step_end")
"""Where an injected failure fires: ``dispatch`` before this rank sends a layer's dispatches;
``combine`` after sending them, while waiting for replies; ``serve`` on receiving another
rank's dispatch, before replying; ``step_end`` after a step, before reporting its tokens."""


class Rank:
    def __init__(self, spec: dict):
        self.spec = spec
        self.rank = spec["rank"]
        self.num_ranks = spec["num_ranks"]
        self.resilience = spec["resilience"]
        self.on_uncovered = spec.get("on_uncovered", "wait")
        torch.set_num_threads(spec.get("threads", 1))
        self.ctx = zmq.Context()
        self.control = curve.server(self.ctx.socket(zmq.PAIR))
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(spec["control"])

        layout = ExpertLayout.from_mapping(torch.tensor(spec["layout"]), num_ranks=self.num_ranks,
                                           num_experts=spec["num_experts"],
                                           max_replicas=spec["max_replicas"])
        # Exact mode: batch-invariant matmuls and per-row attention, so a request's tokens do not
        # depend on its batch-mates or on being recomputed after a migration (bit-identical).
        exact = spec.get("exact", True)
        linear = batch_invariant.linear if exact else None
        self.model = MoEModel.load(spec["model_dir"], experts=False, linear=linear,
                                   attention_mode="per_row" if exact else "batched")
        slots = {l: layout.experts_on_rank(l, self.rank) for l in range(layout.num_layers)}
        self.backup = HostBackup(spec["host_backup"]) if spec.get("host_backup") else None
        self.bank = self._load_bank(spec["model_dir"], slots)
        if linear is not None:
            self.bank.linear = linear
        # What the slots hold (``layout``) and what takes tokens (shadows only once their
        # expert lost every regular copy) can differ.
        self.table = RoutingTable(self._route_layout(spec.get("route_layout"), layout))
        self.live = frozenset(range(self.num_ranks))
        self.epoch = 0
        self.kv = self.model.make_kv_cache(spec["kv_blocks"], spec["block_size"])
        # KV checkpoints (resilient_ep.kv): saves off the decode loop, restores of moved requests.
        self.kvc = None
        if spec.get("kv_checkpoint"):
            from .kv_checkpointing import RankKV
            self.kvc = RankKV(self.rank, self.num_ranks, self.kv, spec["kv_checkpoint"])
        self.sched = RankScheduler(self.kv, on_drop=self.kvc.forget if self.kvc else None)
        self.transport = ZmqTransport(self.rank, spec["data"], ctx=self.ctx)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.transport.inbox, zmq.POLLIN)
        self.exchange: MoEExchange | None = None
        self._unsent_replies: list[tuple[int, dict, list]] = []
        self.layout_version = 0
        if spec.get("membership"):  # a rank (re)joining a running instance
            self._apply_view(spec["membership"], spec.get("route_layout"))
        self.step = 0
        self.fenced = False
        self.stop = False
        # Failure injection: {"point": one of FAIL_POINTS, "step": n, "signal": "KILL"|"STOP"}.
        self.fail_at = spec.get("fail_at")
        # Fault injection (tests, ``resilient-ep chaos``): a request whose first token is
        # this id kills the rank that computes it, like an input that crashes a kernel.
        self.poison_token = spec.get("poison_token")
        self.dropped: Counter[str] = Counter()  # control messages dropped, by reason
        self.beacon = None            # Beacon (one host) or LeaseBeacon (several hosts)
        self.lease = {"expiries": 0, "discarded_steps": 0}
        """Several hosts: times this rank's lease ran out, steps computed but not emitted."""
        self._had_lease = False
        self._dropped_sent: dict[str, int] = {}
        self.repairing: set[tuple[int, int]] = set()

    # ------------------------------------------------------------------ control
    def _send_control(self, msg: dict) -> None:
        self.control.send(wire.encode_header(msg))

    def _on_control(self, msg: dict) -> None:
        t = msg["t"]
        if t == "add":
            req = RankRequest(msg["rid"], list(msg["tokens"]), msg["max_new"], msg.get("eos"))
            if self.kvc is None or not self.kvc.add(req, msg.get("restore")):
                self.sched.add(req)
        elif t == "membership":
            self._on_membership(msg)
        elif t == "drop":
            self.sched.drop(msg["rid"])
            if self.kvc is not None:
                self.kvc.drop(msg["rid"])
        elif t == "kv":
            if self.kvc is not None:
                self.kvc.set_paused(msg["paused"])
        elif t == "shutdown":
            self.stop = True
        elif t == "rejoin":  # re-admission after a fence: weights are loaded, we are warm
            self._send_control({"t": "ready", "rank": self.rank, "pid": os.getpid()})
        elif t == "layout":  # same membership, new placement (weight repair)
            if msg["epoch"] == self.epoch and msg["version"] > self.layout_version:
                self.layout_version = msg["version"]
                self._set_repairing(msg)
                self.table.update(self._layout_from(msg["layout"]))
                if self.exchange is not None:
                    self.exchange.reroute(self.live, self._wait_for(self.exchange.layer))
            else:  # overtaken by a newer membership or layout
                self.dropped["stale"] += 1
        elif t == "repair":
            self._repair(msg["moves"])
        else:  # a newer coordinator's message, or garbage: dropped, counted
            self.dropped["unknown"] += 1

    def _apply_view(self, membership: dict, layout_rows) -> None:
        """Start from a running instance's membership and routing (joining: not live yet)."""
        states = tuple(RankState(s) for s in membership["states"])
        self.epoch = membership["epoch"]
        self.live = frozenset(r for r, s in enumerate(states) if s is RankState.LIVE)
        layout = None
        if layout_rows is not None:
            layout = ExpertLayout.from_mapping(torch.tensor(layout_rows), num_ranks=self.num_ranks,
                                               num_experts=self.table.num_experts,
                                               max_replicas=self.table.max_replicas)
        self.table.update(layout, torch.tensor([s is RankState.LIVE for s in states]),
                          epoch=self.epoch)
        self.transport.configure(self.epoch, self.live)
        if self.kvc is not None:
            self.kvc.configure(self.epoch, self.live)

    def _on_membership(self, msg: dict) -> None:
        view = MembershipView(msg["epoch"], tuple(RankState(s) for s in msg["states"]))
        if view.epoch <= self.epoch:
            self.dropped["stale"] += 1  # an epoch this rank has already moved past
            return
        if not view.is_live(self.rank):
            # Fenced: we were declared hung (and may have been only slow). Drop our requests
            # (the coordinator moved them) and whatever step is in flight; anything late we
            # still send carries the old epoch and is dropped by every member. Keep the
            # weights and keep heartbeating: the coordinator may re-admit us.
            self.fenced = True
            return
        self.fenced = False
        self.epoch = view.epoch
        self.layout_version = max(self.layout_version, msg.get("version", 0))
        self.live = frozenset(view.live_ranks)
        layout = None
        if msg.get("layout") is not None:
            layout = ExpertLayout.from_mapping(torch.tensor(msg["layout"]), num_ranks=self.num_ranks,
                                               num_experts=self.table.num_experts,
                                               max_replicas=self.table.max_replicas)
        mask = torch.tensor([s is RankState.LIVE for s in view.states])
        self.table.update(layout, mask, epoch=view.epoch)  # in place
        self.transport.configure(view.epoch, self.live)
        if self.kvc is not None:
            self.kvc.configure(view.epoch, self.live)
        self._set_repairing(msg)
        if self.exchange is not None:
            self.exchange.reroute(self.live, self._wait_for(self.exchange.layer))

    def _set_repairing(self, msg: dict) -> None:
        """The (layer, expert)s whose weights are being repaired: what ``wait`` waits for."""
        if "repairing" in msg:
            self.repairing = {(int(l), int(e)) for l, e in msg["repairing"]}

    def _wait_for(self, layer: int) -> frozenset[int]:
        """Experts of ``layer`` a token may wait for (``recovery.on_uncovered=wait``): those a
        repair is bringing back. One that nothing will bring back is degraded instead."""
        if self.on_uncovered != "wait":
            return frozenset()
        return frozenset(e for l, e in self.repairing if l == layer)

    def _route_layout(self, rows, default: ExpertLayout) -> ExpertLayout:
        if rows is None:
            return default
        return ExpertLayout.from_mapping(torch.tensor(rows), num_ranks=self.num_ranks,
                                         num_experts=default.num_experts,
                                         max_replicas=default.max_replicas)

    def _layout_from(self, rows) -> ExpertLayout:
        return ExpertLayout.from_mapping(torch.tensor(rows), num_ranks=self.num_ranks,
                                         num_experts=self.table.num_experts,
                                         max_replicas=self.table.max_replicas)

    def _load_bank(self, model_dir: str, slots: dict) -> ExpertBank:
        """This rank's experts: from the host backup where it holds them all (a rank started
        again loads from memory), else from the model files; then the backup gets what it
        lacks (the first rank to write an expert wins)."""
        bank = None
        if self.backup is not None:
            got = {}
            for layer, experts in slots.items():
                for e in experts:
                    if e >= 0 and (layer, e) not in got:
                        got[(layer, e)] = self.backup.get(str(layer), e)
            if got and all(v is not None for v in got.values()):
                bank = ExpertBank.load(model_dir, {l: [-1] * len(x) for l, x in slots.items()})
                for layer, experts in slots.items():
                    for i, e in enumerate(experts):
                        if e >= 0:
                            w = got[(layer, e)]
                            bank.set_slot(layer, i, ExpertWeights(w["gate_up"], w["down"]), e)
                self.loaded_from = "host"
        if bank is None:
            bank = ExpertBank.load(model_dir, slots)
            self.loaded_from = "disk"
        if self.backup is not None:
            for layer, experts in slots.items():
                for i, e in enumerate(experts):
                    if e >= 0 and not self.backup.has(str(layer), e):
                        w = bank.get_slot(layer, i)
                        self.backup.put(str(layer), e, {"gate_up": w.gate_up, "down": w.down})
        return bank

    def _read_expert(self, layer: int, expert: int, source: str) -> ExpertWeights | None:
        """One expert's weights from ``source`` (``shadow``: a slot of ours, ``host``: the
        host backup, ``disk``: the model files); None when it lacks them."""
        if source == "shadow":
            slot = self.bank.expert_to_slot(layer).get(expert)
            if slot is None:
                return None
            w = self.bank.get_slot(layer, slot)
            return ExpertWeights(w.gate_up.clone(), w.down.clone())
        if source == "host":
            got = self.backup.get(str(layer), expert) if self.backup is not None else None
            return None if got is None else ExpertWeights(got["gate_up"], got["down"])
        if source == "disk":
            return ExpertBank.read_expert(self.spec["model_dir"], layer, expert)
        return None

    def _repair(self, moves: list) -> None:
        """Load experts that lost every replica into our slots, from the first source that
        has them (the coordinator's list, cheapest first; the routing tables no longer point
        at these slots while we write them)."""
        t0 = time.time()
        S = self.table.slots_per_rank
        done = []
        for layer, slot, expert, evicted, *rest in moves:
            if slot // S != self.rank:
                continue
            for source in (rest[0] if rest else ["disk"]):
                try:
                    weights = self._read_expert(layer, expert, source)
                except Exception:  # a source that fails: the next one
                    weights = None
                if weights is not None:
                    self.bank.set_slot(layer, slot % S, weights, expert)
                    done.append((layer, slot, expert, evicted, source))
                    break
        self._send_control({"t": "repaired", "rank": self.rank, "epoch": self.epoch,
                            "moves": done, "seconds": time.time() - t0})

    def _drop_all(self) -> None:
        for rid in list(self.sched.running):
            self.sched.drop(rid)
        self.exchange = None

    def holds_lease(self) -> bool:
        """May this rank serve now? Always on one host; between hosts only while the front
        end's last answer to a heartbeat sent within ``detector.lease_ms`` holds."""
        b = self.beacon
        if b is None or not hasattr(b, "holds_lease"):
            return True
        ok = b.holds_lease()
        if self._had_lease and not ok:
            self.lease["expiries"] += 1
            self.lease["expired_at"] = time.time()
        self._had_lease = ok
        return ok

    def _maybe_fail(self, point: str) -> None:
        f = self.fail_at
        if f and f["point"] == point and self.step >= f.get("step", 0):
            self.fail_at = None
            os.kill(os.getpid(), getattr(signal, "SIG" + f.get("signal", "KILL")))

    # ------------------------------------------------------------------ message pump
    def pump(self, timeout_ms: float) -> None:
        """Handle whatever arrives within ``timeout_ms``: control, dispatches, combines."""
        if self._unsent_replies:
            # Replies a member's reconnecting socket refused: send again, drop for non-members.
            self._unsent_replies = [(d, h, t) for d, h, t in self._unsent_replies
                                    if d in self.transport.members and not self.transport.send(d, h, t)]
        events = dict(self.poller.poll(timeout_ms))
        if self.control in events:
            while True:
                try:
                    raw = self.control.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = wire.decode_header(raw)
                    self._on_control(msg)
                except wire.WireError as e:
                    self.dropped[e.reason] += 1
                except wire.BAD_CONTENT:
                    self.dropped["content"] += 1
                    print(f"rank {self.rank}: control message dropped:", file=sys.stderr)
                    traceback.print_exc(file=sys.stderr)
        if self.transport.inbox in events or self.transport.has_released():
            for _ in range(256):
                msg = self.transport.recv_nowait()
                if msg is None:
                    break
                header, tensors = msg
                if header["t"] == "dispatch":
                    self._maybe_fail("serve")
                    refused = serve_dispatch(self.transport, self.bank, header, tensors)
                    if refused is not None:
                        self._unsent_replies.append(refused)
                elif header["t"] == "combine" and self.exchange is not None:
                    self.exchange.on_combine(header, tensors)

    # ------------------------------------------------------------------ model step
    def _moe(self, layer: int, x, ids, weights):
        self._maybe_fail("dispatch")
        self.exchange = MoEExchange(rank=self.rank, transport=self.transport, table=self.table,
                                    bank=self.bank, layer=layer, step=self.step, x=x,
                                    topk_ids=ids, topk_weights=weights,
                                    on_uncovered=self.on_uncovered,
                                    wait_for=self._wait_for(layer))
        self._maybe_fail("combine")
        deadline = time.monotonic() + self.spec["step_timeout_s"]
        while not self.exchange.complete:
            if self.stop:
                raise _Stopped()
            if self.fenced:
                raise _Fenced()
            if not self.holds_lease():
                raise _LeaseLost()
            self.exchange.retry()
            if time.monotonic() > deadline and not self.exchange.pending:
                self.exchange.stop_waiting()  # "wait": no repair in time; degraded, counted
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: layer {layer} of step {self.step} got no "
                                   f"reply from ranks {sorted({d for d, _ in self.exchange.pending.values()})} "
                                   f"within transport.step_timeout_ms")
            self.pump(1)
        res = self.exchange.result()
        self.exchange = None
        return res

    @torch.inference_mode()
    def run_step(self) -> None:
        plan = self.sched.plan()
        if plan is None:
            return
        if self.poison_token is not None and any(
                r.tokens[:1] == [self.poison_token] for r in plan.requests):
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.time()
        epoch0 = self.epoch
        model = self.model
        h = model.embed(plan.token_ids)
        degraded = torch.zeros(h.shape[0], dtype=torch.bool)
        failed = torch.zeros(h.shape[0], dtype=torch.bool)
        uncovered: list[tuple[int, int]] = []
        for layer in range(model.config.num_layers):
            h = model.attention(layer, h, plan.batch, self.kv)
            x, ids, w = model.route(layer, h)
            res = self._moe(layer, x, ids, w)
            h = model.moe_add(h, res.out)
            degraded |= res.degraded
            failed |= res.failed
            uncovered += [(layer, e) for e in res.uncovered]
        last = plan.batch.last_token_index
        logits = model.logits(h[last])
        next_tokens = torch.argmax(logits, dim=-1).tolist()
        req_failed = [bool(failed[plan.batch.query_start[i]:plan.batch.query_start[i + 1]].any())
                      for i in range(len(plan.requests))]
        req_degraded = [bool(degraded[plan.batch.query_start[i]:plan.batch.query_start[i + 1]].any())
                        for i in range(len(plan.requests))]
        if not self.holds_lease():
            # Computed, but the lease ran out meanwhile: the front end may be moving these
            # requests. Emit nothing; the step is run again (same plan, the KV rewritten
            # alike) once a lease comes back, unless a fence drops the requests first.
            raise _LeaseLost()
        items = []
        for i, (rid, tok, fin) in enumerate(self.sched.commit(plan, next_tokens)):
            if req_failed[i]:
                self.sched.drop(rid)
                items.append((rid, None, True, "uncovered"))
            else:
                items.append((rid, tok, fin, "degraded" if req_degraded[i] else None))
        kv_report = self.kvc.step(self.sched, plan.requests) if self.kvc is not None else None
        self._maybe_fail("step_end")
        self._send_control({"t": "tokens", "rank": self.rank, "step": self.step, "epoch": self.epoch,
                            "epoch_start": epoch0, "t0": t0, "t1": time.time(),
                            "num_tokens": int(plan.token_ids.numel()), "items": items,
                            "uncovered": sorted(set(uncovered)), "kv": kv_report,
                            "lease": dict(self.lease), **self._drop_report()})
        self.step += 1

    def _drop_report(self) -> dict:
        """What this rank dropped since it started (control and data messages, by reason),
        sent with a step's tokens when it changed: the coordinator's metrics show it."""
        now = {f"control/{k}": v for k, v in self.dropped.items()}
        now.update({f"data/{k}": v for k, v in self.transport.dropped.items()})
        if now == self._dropped_sent:
            return {}
        self._dropped_sent = now
        return {"dropped": now}

    # ------------------------------------------------------------------ main loop
    def serve(self) -> int:
        peers = sorted(self.live) if self.spec.get("membership") else range(self.num_ranks)
        missing = self.transport.wait_connected(
            peers, time.monotonic() + self.spec.get("connect_timeout_s", 60))
        if missing:
            print(f"rank {self.rank}: peers {missing} never connected", file=sys.stderr)
            return 1
        interval = self.spec["heartbeat_interval_ms"] / 1000.0
        if self.spec.get("udp"):  # several hosts: leased; serving needs one, resilience or not
            from ..liveness.datagrams import LeaseBeacon
            self.beacon = LeaseBeacon(tuple(self.spec["udp"]), self.rank, interval,
                                      self.spec["lease_s"], key=wire.process_key(),
                                      bind_host=self.spec.get("bind_host"))
        elif self.resilience:
            self.beacon = Beacon(self.spec["heartbeat"], self.rank, interval)
        beacon = self.beacon
        self._send_control({"t": "ready", "rank": self.rank, "pid": os.getpid(),
                            "loaded_from": self.loaded_from})
        try:
            while not self.stop:
                self.pump(0 if self.sched.running else (1 if self.kvc and self.kvc.pending else 5))
                if self.fenced:
                    self._drop_all()
                    continue
                if self.kvc is not None:
                    self.kvc.poll(self.sched)
                if self.sched.running and not self.stop:
                    if not self.holds_lease():
                        self.pump(5)  # no lease: serve nothing, wait for one (or a fence)
                        continue
                    try:
                        self.run_step()
                    except _Fenced:
                        self.exchange = None
                    except _LeaseLost:
                        self.exchange = None
                        self.lease["discarded_steps"] += 1
        except _Stopped:
            pass
        finally:
            if beacon is not None:
                beacon.stop()
            if self.kvc is not None:
                self.kvc.shutdown()
            self.transport.shutdown()
            self.control.close(linger=0)
            self.ctx.term()
        return 0


class _Stopped(Exception):
    pass


class _Fenced(Exception):
    pass


class _LeaseLost(Exception):
    """The lease ran out during a step: nothing of it is emitted."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    if spec.get("key_file"):  # every socket of this process speaks for this instance only
        curve.set_enabled(spec.get("curve", True))
        wire.set_key(wire.load_key(spec["key_file"]), tag=not curve.enabled())
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops us
    return Rank(spec).serve()


if __name__ == "__main__":
    sys.exit(main())
