"""``resilient-ep serve MODEL_DIR``: the reference runtime behind an OpenAI-compatible API.

- ``GET /v1/models``
- ``POST /v1/completions``: ``prompt`` (text or token ids), ``max_tokens`` (default 16),
  ``stream`` (server-sent events, ``data: [DONE]`` at the end); greedy only, every field
  checked before a rank sees it (``completions.py``: a 400 naming the field)
- ``GET /resilience/status``: ``{"epoch", "ranks": [{"rank", "pid", "state"}], "uncovered_experts"}``
- ``GET /health``

Standard library HTTP server (threads), bound to 127.0.0.1 unless told otherwise. Ctrl-C
stops the server and every rank process.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..config import ResilienceConfig
from ..runtime.coordinator import Coordinator
from .completions import ApiError, parse_completion

__all__ = ["add_arguments", "main", "make_server"]

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


def _content_length(value: str | None) -> int:
    if value is None:
        return 0
    if not value.strip().isdigit():
        raise ApiError(400, f"Content-Length must be a non-negative integer, got {value!r:.40}")
    n = int(value)
    if n > MAX_BODY_BYTES:
        raise ApiError(413, f"the body ({n} bytes) is larger than {MAX_BODY_BYTES} bytes")
    return n


def make_server(coord: Coordinator, model_dir: Path, model_name: str, host: str, port: int
                ) -> ThreadingHTTPServer:
    tokenizer = _Tokenizer(model_dir)
    model_cfg = json.loads((model_dir / "config.json").read_text())
    max_len = model_cfg.get("max_position_embeddings", 4096)
    vocab_size = int(model_cfg["vocab_size"])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: one line per request on stderr is noise here
            pass

        def _json(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: ApiError) -> None:
            self._json(e.status, e.body())

        def do_GET(self):
            if self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": int(time.time()),
                     "owned_by": "resilient-ep", "max_model_len": max_len}]})
            elif self.path == "/resilience/status":
                self._json(200, coord.status())
            elif self.path == "/health":
                self._json(200 if coord.errored() is None else 503, {"ok": coord.errored() is None})
            else:
                self._error(ApiError(404, f"no route {self.path}"))

        def do_POST(self):
            if self.path != "/v1/completions":
                return self._error(ApiError(404, f"no route {self.path}"))
            try:
                n = _content_length(self.headers.get("Content-Length"))
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ApiError(400, f"body is not valid JSON: {e}")
                if isinstance(body, dict) and body.get("model", model_name) != model_name:
                    raise ApiError(404, f"model {body.get('model')!r:.80} not found (serving "
                                        f"{model_name!r})", "model")
                req = parse_completion(body, tokenizer.encode, vocab_size=vocab_size,
                                       max_len=max_len)
                ids, max_tokens, stream = req.prompt_ids, req.max_tokens, req.stream
            except ApiError as e:
                self.close_connection = True  # the body may not have been read
                return self._error(e)
            rec = coord.submit(ids, max_tokens, eos=tokenizer.eos)
            cid = f"cmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                prev = ""
                try:
                    for _tok in rec.stream(REQUEST_TIMEOUT_S):
                        text = tokenizer.decode(rec.generated[:])
                        delta, prev = text[len(prev):], text
                        self._sse({"id": cid, "object": "text_completion", "created": created,
                                   "model": model_name, "choices": [
                                       {"index": 0, "text": delta, "finish_reason": None}]})
                    self._sse({"id": cid, "object": "text_completion", "created": created,
                               "model": model_name, "choices": [
                                   {"index": 0, "text": "", "finish_reason": _reason(rec, tokenizer)}],
                               **({"error": {"message": rec.error}} if rec.error else {})})
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True
                return
            try:
                rec.wait(REQUEST_TIMEOUT_S)
            except TimeoutError as e:
                return self._error(ApiError(504, str(e)))
            if rec.error:
                return self._json(500, {"error": {"message": rec.error, "type": "server_error",
                                                  "param": None, "code": 500}})
            self._json(200, {"id": cid, "object": "text_completion", "created": created,
                             "model": model_name,
                             "choices": [{"index": 0, "text": tokenizer.decode(rec.generated),
                                          "token_ids": rec.generated, "logprobs": None,
                                          "finish_reason": _reason(rec, tokenizer)}],
                             "usage": {"prompt_tokens": len(ids),
                                       "completion_tokens": len(rec.generated),
                                       "total_tokens": len(ids) + len(rec.generated)}})

        def _sse(self, obj) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _reason(rec, tokenizer) -> str:
    if rec.error:
        return "error"
    if tokenizer.eos is not None and rec.generated and rec.generated[-1] == tokenizer.eos:
        return "stop"
    return "length"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json + safetensors + tokenizer.json)")
    p.add_argument("--ranks", type=int, default=4, help="rank processes (default 4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--resilience-config", help="YAML configuration file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration field, e.g. --set detector.heartbeat_timeout_ms=300")
    p.add_argument("--served-model-name", help="name in /v1/models (default: the directory name)")


def main(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"model: {str(model_dir)!r} has no config.json")
    cfg = ResilienceConfig.from_yaml(args.resilience_config) if args.resilience_config else ResilienceConfig()
    cfg = cfg.with_overrides(args.set)
    name = args.served_model_name or model_dir.name
    print(f"starting {args.ranks} ranks for {model_dir} ...", flush=True)
    coord = Coordinator(model_dir, num_ranks=args.ranks, config=cfg).start()
    server = None
    try:
        server = make_server(coord, model_dir, name, args.host, args.port)
        host, port = server.server_address[:2]
        print(f"serving {name!r} on http://{host}:{port} (ranks {coord.pids}); Ctrl-C to stop",
              flush=True)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
    finally:
        if server is not None:
            threading.Thread(target=server.shutdown, daemon=True).start()
            server.server_close()
        coord.shutdown()
    return 0
