"""What ``resilient-ep chaos`` needs from an engine under test (:class:`Target`), the bad
inputs every API must refuse, and the forged packets sent at an instance's sockets."""

from __future__ import annotations

import os
import random
import time

__all__ = ["Target", "BAD_INPUTS", "forge_packets"]

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
    def membership_now(self) -> tuple[int, set[int]]:
        """The epoch and the live ranks, from one view of the membership (two separate reads
        straddling a change would show an epoch moved without a rank to show for it)."""
        ...
    def rejoinable(self) -> list[int]:
        return self.lost()
    def victims(self) -> list[int]:
        """Live ranks this run may take down now."""
        return self.live()
    def signal_rank(self, rank: int, sig: int, worker: bool = False) -> None: ...
    def rejoin(self, rank: int) -> float: ...
    def settle_rejoins(self, timeout_s: float) -> list[dict]:
        """At the end of a run, with the load still on: wait (bounded) for the rejoins still
        under way; every rejoin's outcome (``rank``, ``state``: ``live`` or not)."""
        return []
    def forge(self, rng: random.Random, n: int) -> int: ...
    def poison_prompt(self) -> list[int] | None: ...
    def check(self, min_live: int) -> None:
        """Refuse a run whose own settings would make outputs inexact by design."""
    def status(self) -> dict: ...
    def metrics(self) -> dict: ...
    def close(self) -> None: ...


def forge_packets(rng: random.Random, n: int, endpoints: list[tuple[str, str]], *,
                  live: list[int], lost: list[int]) -> int:
    """Send ``n`` forged packets spread over ``endpoints`` (``(address, "push")`` for a
    ZeroMQ PULL socket, ``(address, "dealer")`` for a ROUTER) from a process that does not
    hold the instance's key; returns how many were sent."""
    import zmq

    from ...transport import wire

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
