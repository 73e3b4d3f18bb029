"""``resilient-ep serve MODEL_DIR``: the reference runtime behind an OpenAI-compatible API
(``openai_app.py``: FastAPI under uvicorn; the routes are listed there).

Bound to 127.0.0.1 unless told otherwise; ``--api-key`` (or ``RESILIENT_EP_API_KEY``) guards
the API routes. Ctrl-C stops the server and every rank process. :func:`serve_in_thread` runs
the same server inside a process (tests, ``resilient-ep chaos``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..config import ResilienceConfig

__all__ = ["add_arguments", "main", "serve_in_thread", "RunningServer"]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, lifespan="off")
    return uvicorn.Server(config)


class RunningServer:
    """A server started by :func:`serve_in_thread`: ``url``, and ``stop()``."""

    def __init__(self, server, thread: threading.Thread, sock: socket.socket):
        self._server, self._thread, self._sock = server, thread, sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


def serve_in_thread(coord, model_dir, model_name: str, *, host: str = "127.0.0.1",
                    port: int = 0, api_key: str | None = None,
                    timeout: float = 30.0) -> RunningServer:
    """Serve ``coord`` from a thread of this process; returns once it accepts requests."""
    from .openai_app import make_app

    sock = _bind(host, port)
    server = _uvicorn_server(make_app(coord, model_dir, model_name, api_key=api_key))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="resilient-ep-http")
    thread.start()
    end = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            sock.close()
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return RunningServer(server, thread, sock)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json + safetensors + tokenizer.json)")
    p.add_argument("--ranks", type=int, default=4, help="rank processes (default 4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--resilience-config", help="YAML configuration file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration field, e.g. --set detector.heartbeat_timeout_ms=300")
    p.add_argument("--served-model-name", help="name in /v1/models (default: the directory name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API routes "
                                     "(default: $RESILIENT_EP_API_KEY, else none)")


def main(args: argparse.Namespace) -> int:
    import fastapi  # noqa: F401  (a missing extra stops us before any rank starts)
    import uvicorn  # noqa: F401

    from ..runtime.coordinator import Coordinator
    from .openai_app import make_app

    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"model: {str(model_dir)!r} has no config.json")
    cfg = ResilienceConfig.from_yaml(args.resilience_config) if args.resilience_config else ResilienceConfig()
    cfg = cfg.with_overrides(args.set)
    name = args.served_model_name or model_dir.name
    api_key = args.api_key or os.environ.get("RESILIENT_EP_API_KEY") or None
    print(f"starting {args.ranks} ranks for {model_dir} ...", flush=True)
    coord = Coordinator(model_dir, num_ranks=args.ranks, config=cfg).start()
    sock = None
    try:
        sock = _bind(args.host, args.port)
        server = _uvicorn_server(make_app(coord, model_dir, name, api_key=api_key))
        host, port = sock.getsockname()[:2]
        print(f"serving {name!r} on http://{host}:{port} (ranks {coord.pids})"
              f"{' with an API key' if api_key else ''}; Ctrl-C to stop", flush=True)
        server.run(sockets=[sock])  # returns on SIGINT / SIGTERM (uvicorn's handlers)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        if sock is not None:
            sock.close()
        coord.shutdown()
    return 0
