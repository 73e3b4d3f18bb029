"""Mutable EP membership: an epoch number plus the set of live ranks.

Glossary
- *epoch*: a counter that rises by one on every membership change (a rank fails, is fenced or
  joins). Every message and every routing table carries the epoch it was made under; a message
  from an older epoch is stale and is dropped by its receiver.
- *live*: the rank takes part in dispatch/combine and serves requests.
- *dead*: the rank's process is gone (crash detected by the transport).
- *fenced*: the rank stopped answering (hang). It may still be running and may still send; its
  messages are ignored until it rejoins under a new epoch.
- *joining*: a repaired rank warming up in the background; not yet in the routing tables.

``live_mask`` is a bool tensor ``[R]`` whose storage never moves: transitions write into it with
``copy_`` so a captured CUDA graph (or a DeepEP mask buffer fed from it) sees the new values.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Iterable

import torch

__all__ = ["RankState", "MembershipView", "Membership", "StaleEpochError"]


class RankState(str, enum.Enum):
    LIVE = "live"
    DEAD = "dead"
    FENCED = "fenced"
    JOINING = "joining"


class StaleEpochError(RuntimeError):
    """A message or table made under an older epoch than the receiver's."""

    def __init__(self, got: int, current: int):
        self.got = got
        self.current = current
        super().__init__(f"stale epoch {got} (current epoch is {current})")


@dataclass(frozen=True)
class MembershipView:
    """An immutable snapshot: what one epoch looked like."""

    epoch: int
    states: tuple[RankState, ...]

    @property
    def live_ranks(self) -> tuple[int, ...]:
        return tuple(r for r, s in enumerate(self.states) if s is RankState.LIVE)

    @property
    def num_ranks(self) -> int:
        return len(self.states)

    def is_live(self, rank: int) -> bool:
        return self.states[rank] is RankState.LIVE


class Membership:
    """Epoch + per-rank state, thread-safe. Transitions raise the epoch monotonically.

    >>> m = Membership(4)
    >>> m.fail([2]).epoch, m.view().live_ranks
    (1, (0, 1, 3))
    """

    def __init__(self, num_ranks: int, *, device: torch.device | str = "cpu"):
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        self._lock = threading.Lock()
        self._epoch = 0
        self._states = [RankState.LIVE] * num_ranks
        # [R] bool, True where the rank is live. Storage fixed for the object's life.
        self.live_mask = torch.ones(num_ranks, dtype=torch.bool, device=device)

    # ------------------------------------------------------------------ reading
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_ranks(self) -> int:
        return len(self._states)

    def view(self) -> MembershipView:
        with self._lock:
            return MembershipView(self._epoch, tuple(self._states))

    def state(self, rank: int) -> RankState:
        return self._states[rank]

    def is_stale(self, epoch: int) -> bool:
        """True for a message made under an older epoch than the current one."""
        return epoch < self._epoch

    def check_epoch(self, epoch: int) -> None:
        """Raise :class:`StaleEpochError` for a message from an older epoch."""
        if epoch < self._epoch:
            raise StaleEpochError(epoch, self._epoch)

    # ------------------------------------------------------------------ transitions
    def fail(self, ranks: Iterable[int], *, state: RankState = RankState.DEAD) -> MembershipView:
        """Mark ranks dead (crash) or fenced (hang). One epoch bump for the whole set;
        ranks already out are ignored (no bump if nothing changes)."""
        if state not in (RankState.DEAD, RankState.FENCED):
            raise ValueError(f"fail() takes DEAD or FENCED, got {state}")
        return self._transition(ranks, state, allowed_from=(RankState.LIVE, RankState.JOINING))

    def begin_join(self, ranks: Iterable[int]) -> MembershipView:
        """A repaired rank starts warming up (no epoch bump: tables do not change yet)."""
        with self._lock:
            for r in self._validate(ranks):
                if self._states[r] in (RankState.DEAD, RankState.FENCED):
                    self._states[r] = RankState.JOINING
            return MembershipView(self._epoch, tuple(self._states))

    def join(self, ranks: Iterable[int]) -> MembershipView:
        """Admit ranks into the live set: one epoch bump, live mask updated in place."""
        return self._transition(ranks, RankState.LIVE,
                                allowed_from=(RankState.DEAD, RankState.FENCED, RankState.JOINING))

    def _validate(self, ranks: Iterable[int]) -> list[int]:
        out = []
        for r in ranks:
            if not 0 <= int(r) < len(self._states):
                raise ValueError(f"rank {r} out of range [0, {len(self._states)})")
            out.append(int(r))
        return out

    def _transition(self, ranks: Iterable[int], to: RankState,
                    allowed_from: tuple[RankState, ...]) -> MembershipView:
        with self._lock:
            changed = False
            for r in self._validate(ranks):
                if self._states[r] in allowed_from and self._states[r] is not to:
                    self._states[r] = to
                    changed = True
            if changed:
                self._epoch += 1
                mask = torch.tensor([s is RankState.LIVE for s in self._states], dtype=torch.bool)
                self.live_mask.copy_(mask)
            return MembershipView(self._epoch, tuple(self._states))

    def adopt(self, view: MembershipView) -> bool:
        """Take a newer view decided elsewhere (e.g. by a coordinator). Older or equal
        epochs are ignored; returns True when adopted."""
        with self._lock:
            if view.epoch <= self._epoch:
                return False
            if len(view.states) != len(self._states):
                raise ValueError(f"view has {len(view.states)} ranks, membership has {len(self._states)}")
            self._epoch = view.epoch
            self._states = list(view.states)
            self.live_mask.copy_(torch.tensor([s is RankState.LIVE for s in self._states]))
            return True
