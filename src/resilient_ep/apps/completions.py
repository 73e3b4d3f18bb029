"""An OpenAI ``/v1/completions`` request body, checked before any rank sees it.

:func:`parse_completion` turns a decoded JSON body into a :class:`CompletionRequest` or raises
:class:`ApiError` (an OpenAI-style 400 naming the field). What is checked:

- ``prompt``: a string, a one-string list, or a non-empty list of token ids, each an integer
  (not a boolean) in ``[0, vocab_size)``; prompt + ``max_tokens`` within the model's context;
- ``max_tokens``: an integer >= 1 (not a boolean); ``stream``: a boolean (``"false"`` is
  refused, not taken as true);
- sampling: greedy only. Each sampling field the runtime does not implement is accepted only at
  its neutral value (``temperature`` 0, ``top_p`` 1, ``n`` / ``best_of`` 1, penalties 0,
  ``stop`` / ``logprobs`` / ``logit_bias`` / ``suffix`` unset, ``echo`` false) and refused
  otherwise, so nothing is silently ignored;
- any other field is refused, except the ones that change nothing here (``model`` is checked
  by the server, ``user``, ``seed``: greedy decoding does not draw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["ApiError", "CompletionRequest", "parse_completion"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        self.status, self.message, self.param = status, message, param
        super().__init__(message)

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int
    stream: bool


_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "temperature": lambda v: _number(v) and v == 0,
    "top_p": lambda v: _number(v) and v == 1,
    "n": lambda v: _integer(v) and v == 1,
    "best_of": lambda v: v is None or (_integer(v) and v == 1),
    "presence_penalty": lambda v: _number(v) and v == 0,
    "frequency_penalty": lambda v: _number(v) and v == 0,
    "stop": lambda v: v is None or v == [],
    "logprobs": lambda v: v is None,
    "logit_bias": lambda v: v is None or v == {},
    "suffix": lambda v: v is None,
    "echo": lambda v: v is False,
}
_WHAT = {"temperature": "0 (greedy decoding only)", "top_p": "1", "n": "1", "best_of": "1",
         "presence_penalty": "0", "frequency_penalty": "0", "stop": "unset",
         "logprobs": "unset", "logit_bias": "unset", "suffix": "unset", "echo": "false"}
_IGNORED = {"model", "user", "seed", "stream_options"}


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_completion(body: Any, encode: Callable[[str], list[int]], *, vocab_size: int,
                     max_len: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in body:
        if key not in _NEUTRAL and key not in _IGNORED and key not in ("prompt", "max_tokens",
                                                                       "stream"):
            raise ApiError(400, f"unsupported field {key!r}", str(key)[:64])
    for key, ok in _NEUTRAL.items():
        if key in body and not ok(body[key]):
            raise ApiError(400, f"{key} must be {_WHAT[key]} here, got {body[key]!r:.80}", key)

    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(encode(prompt))
    elif isinstance(prompt, list) and prompt and all(_integer(x) for x in prompt):
        ids = list(prompt)
    else:
        raise ApiError(400, "prompt must be a string or a non-empty list of integer token ids, "
                            f"got {prompt!r:.80}", "prompt")
    if not ids:
        raise ApiError(400, "prompt is empty after tokenization", "prompt")
    bad = next((x for x in ids if not 0 <= x < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})",
                       "prompt")

    max_tokens = body.get("max_tokens", 16)
    if not _integer(max_tokens) or max_tokens < 1:
        raise ApiError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r:.40}",
                       "max_tokens")
    if len(ids) + max_tokens > max_len:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                            f"the model's context ({max_len})", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r:.40}", "stream")
    return CompletionRequest(ids, max_tokens, stream)
