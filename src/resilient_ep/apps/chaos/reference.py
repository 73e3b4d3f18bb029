"""The reference runtime under chaos: a :class:`~resilient_ep.runtime.coordinator.Coordinator`
and its OpenAI server in this process, with every event ``resilient-ep chaos`` draws."""

from __future__ import annotations

import random
import signal
from pathlib import Path

from .target import Target, forge_packets

__all__ = ["ReferenceTarget"]


class ReferenceTarget(Target):
    kinds = ("kill", "stop", "rejoin", "forge", "poison", "bad-input")

    def __init__(self, model_dir: Path, *, ranks: int, settings: list[str], hang_timeout_ms: float):
        from ...config import ResilienceConfig
        from ...runtime.coordinator import Coordinator
        from ...runtime.model import MoEConfig
        from ..server import serve_in_thread

        # Two spare slots a rank: with half the ranks lost, every expert still fits, so a
        # repair can always bring back what a loss uncovered (outputs stay exact).
        cfg = ResilienceConfig().with_overrides(
            [f"detector.heartbeat_timeout_ms={hang_timeout_ms}",
             "placement.redundant_slots_per_rank=2", *settings])
        self.model_dir = Path(model_dir)
        self._rejoined: list[dict] = []
        self.vocab = MoEConfig.from_dir(model_dir).vocab_size
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
        from ...membership import RankState

        return [r for r in range(self.num_ranks)
                if self.coord.membership.state(r) in (RankState.DEAD, RankState.FENCED)]

    def epoch(self) -> int:
        return self.coord.membership.epoch

    def membership_now(self) -> tuple[int, set[int]]:
        view = self.coord.membership.view()
        return view.epoch, set(view.live_ranks)

    def rejoinable(self) -> list[int]:
        """Dead ranks (a fenced one wakes up and is taken back by the coordinator itself)."""
        from ...membership import RankState

        return [r for r in range(self.num_ranks)
                if self.coord.membership.state(r) is RankState.DEAD]

    def signal_rank(self, rank: int, sig: int, worker: bool = False) -> None:
        if sig == signal.SIGCONT:
            self.coord.ranks.send_signal(rank, sig)
        else:
            self.coord.kill(rank, sig)

    def rejoin(self, rank: int) -> float:
        took = self.coord.rejoin(rank, timeout=120)  # done when it returns
        self._rejoined.append({"rank": rank, "state": "live", "error": None})
        return took

    def settle_rejoins(self, timeout_s: float) -> list[dict]:
        return list(self._rejoined)

    def poison_prompt(self) -> list[int]:
        return [self._poison, 5, 6, 7]

    def forge(self, rng: random.Random, n: int) -> int:
        from ...transport.zmq_transport import data_endpoint

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
