"""The reference runtime's OpenAI-compatible API as an ASGI app (FastAPI), what
``resilient-ep serve`` runs under uvicorn.

==========================  ====  ===============================================================
route                       auth  answer
==========================  ====  ===============================================================
``GET /v1/models``          yes   the one model served
``POST /v1/completions``    yes   ``prompt`` (text or token ids), ``max_tokens``, ``stream``
                                  (server-sent events, ``data: [DONE]`` last); greedy; the body is
                                  checked before a rank sees it (``completions.py``)
``GET /resilience/status``  yes   epoch, ranks and their states, uncovered experts, poisoned
                                  requests, KV checkpoints
``GET /health``             no    200, or 503 once the runtime has failed
``GET /metrics``            no    Prometheus text (``resilient_ep.metrics``)
==========================  ====  ===============================================================

With an API key (``--api-key`` or ``RESILIENT_EP_API_KEY``) the routes marked *auth* need
``Authorization: Bearer <key>``, as vLLM's server. Every error is an OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``), 404 and 405 included. A client that goes
away, streaming or not, cancels its request: the rank drops it at its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..metrics import CONTENT_TYPE, render
from .completions import ApiError, parse_completion

__all__ = ["make_app", "MAX_BODY_BYTES", "REQUEST_TIMEOUT_S"]

REQUEST_TIMEOUT_S = 600.0
MAX_BODY_BYTES = 16 << 20


class _Tokenizer:
    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg = json.loads((model_dir / "config.json").read_text())
        self.eos = cfg.get("eos_token_id")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _error(e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)


async def _read_body(request) -> bytes:
    """The request body, refused (413) past :data:`MAX_BODY_BYTES` whatever Content-Length
    says; a malformed Content-Length never reaches here (uvicorn answers 400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body ({int(declared)} bytes) is larger than {MAX_BODY_BYTES} "
                            "bytes (Content-Length)")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (after the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _Events:
    """A request's events (``RequestRecord.on_event``, called from the coordinator's thread)
    as an asyncio queue of this loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is gone
            pass


def make_app(coord, model_dir: str | Path, model_name: str, *, api_key: str | None = None):
    """The FastAPI app serving ``coord`` (a started
    :class:`~resilient_ep.runtime.coordinator.Coordinator`)."""
    model_dir = Path(model_dir)
    tokenizer = _Tokenizer(model_dir)
    model_cfg = json.loads((model_dir / "config.json").read_text())
    max_len = int(model_cfg.get("max_position_embeddings", 4096))
    vocab_size = int(model_cfg["vocab_size"])
    app = FastAPI(title="resilient-ep reference runtime", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):  # 404, 405: OpenAI error bodies too
        return _error(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc):
        return _error(ApiError(400, str(exc)))

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _error(exc)

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if api_key and not request.url.path.startswith(("/health", "/metrics")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(ApiError(401, "a valid API key is required "
                                            "(Authorization: Bearer <key>)"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(time.time()),
             "owned_by": "resilient-ep", "max_model_len": max_len}]}

    @app.get("/resilience/status")
    async def status():
        return coord.status()

    @app.get("/health")
    async def health():
        ok = coord.errored() is None
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(render(coord.metrics), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await _read_body(request)
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not valid JSON: {e}")
        if isinstance(body, dict) and body.get("model", model_name) != model_name:
            raise ApiError(404, f"model {body.get('model')!r:.80} not found (serving "
                                f"{model_name!r})", "model")
        req = parse_completion(body, tokenizer.encode, vocab_size=vocab_size, max_len=max_len)
        events = _Events(asyncio.get_running_loop())
        rec = coord.submit(req.prompt_ids, req.max_tokens, eos=tokenizer.eos, on_event=events)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": model_name}
        if req.stream:
            return _CancellingStream(_sse(rec, events, tokenizer, head), coord, rec)
        watch = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done = asyncio.ensure_future(_until_done(events))
            finished, _ = await asyncio.wait({done, watch}, timeout=REQUEST_TIMEOUT_S,
                                             return_when=asyncio.FIRST_COMPLETED)
            if done not in finished:
                done.cancel()
                coord.cancel(rec.rid)
                if watch in finished:  # the client is gone: nobody reads this answer
                    return Response(status_code=499)
                raise ApiError(504, f"request not finished within {REQUEST_TIMEOUT_S} s")
        finally:
            watch.cancel()
        if rec.error:
            raise ApiError(500, rec.error)
        ids = list(rec.generated)
        return {**head, "choices": [{"index": 0, "text": tokenizer.decode(ids),
                                     "token_ids": ids, "logprobs": None,
                                     "finish_reason": _reason(rec, tokenizer)}],
                "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(ids),
                          "total_tokens": len(req.prompt_ids) + len(ids)}}

    return app


class _CancellingStream(StreamingResponse):
    """Server-sent events that cancel their request when the client goes away, whether
    a token was being sent (the send fails) or none was flowing (a disconnect event)."""

    def __init__(self, body, coord, rec):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._coord, self._rec = coord, rec

    async def __call__(self, scope, receive, send):
        stream = asyncio.ensure_future(super().__call__(scope, receive, send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not stream.done():
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)
            elif stream.exception() is not None:
                raise stream.exception()
        finally:
            watch.cancel()
            if not self._rec.finished:
                self._coord.cancel(self._rec.rid)


async def _until_done(events: _Events) -> None:
    while (await events.queue.get())[0] != "done":
        pass


async def _sse(rec, events: _Events, tokenizer, head: dict):
    prev = ""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        try:
            kind, _ = await asyncio.wait_for(events.queue.get(), timeout=max(left, 0.001))
        except asyncio.TimeoutError:
            yield _event({**head, "choices": [{"index": 0, "text": "", "finish_reason": "error"}],
                          "error": {"message": f"stream timed out after {REQUEST_TIMEOUT_S} s",
                                    "type": "server_error", "code": 504}})
            break
        if kind == "done":
            yield _event({**head, "choices": [{"index": 0, "text": "",
                                               "finish_reason": _reason(rec, tokenizer)}],
                          **({"error": {"message": rec.error, "type": "server_error",
                                        "code": 500}} if rec.error else {})})
            break
        text = tokenizer.decode(rec.generated[:])
        delta, prev = text[len(prev):], text
        yield _event({**head, "choices": [{"index": 0, "text": delta, "finish_reason": None}]})
    yield b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _reason(rec, tokenizer) -> str:
    if rec.error:
        return "error"
    if tokenizer.eos is not None and rec.generated and rec.generated[-1] == tokenizer.eos:
        return "stop"
    return "length"
