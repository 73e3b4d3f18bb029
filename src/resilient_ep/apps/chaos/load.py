"""The chaos run's workload and its clients: seeded prompts (text and token ids) and threads
of the ``openai`` client sending them, streaming or not, until stopped."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .target import Target

__all__ = ["Answer", "Workload", "make_workload", "ask", "client", "Load"]

WORDS = ("the cat sat on a warm mat while rain fell over quiet hills and old roads "
         "wind carried songs from distant towns where people gathered near bright fires "
         "stories of rivers mountains ships and stars filled every long evening").split()


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


def client(target: Target, timeout: float = 180.0):
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
        cause = e.__cause__ or e.__context__  # the transport's own error, under openai's
        a.error = f"{type(e).__name__}: {str(e)[:300]}" + (
            f" (from {type(cause).__name__}: {str(cause)[:200]})" if cause is not None else "")
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
        api = client(self.target)
        while not self._stop.is_set():
            i = rng.randrange(len(self.w.prompts))
            a = ask(api, self.target.model, self.w, i, stream=rng.random() < 0.6)
            with self._lock:
                self.answers.append(a)

    def stop(self, timeout: float = 240.0) -> bool:
        self._stop.set()
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)
