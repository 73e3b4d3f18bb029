"""Rejoin with several API servers (vLLM's default for ``--data-parallel-size N``): the
launcher runs the rejoins, the API servers take the requests and reach the engines.

vLLM connects every engine core to each API server and to nothing else, and the ``vllm
serve`` launcher, which started the engine cores and runs the instance's membership
authority, holds no engine client. So:

- every API server runs an :class:`EngineCallRelay` on ``ipc://<instance dir>/engine-calls-
  <API server index>``: an engine-core utility call sent there (``collective_rpc``, our
  counters) is made through that API server's engine client and its result sent back;
  :func:`call_engine` is the launcher's side (the first relay that answers a ping);
- the launcher runs a :class:`RejoinService` on ``ipc://<instance dir>/rejoin`` over its
  :class:`~.rejoin.Rejoiner`: a ``POST /resilience/ranks/{rank}/rejoin`` to any API server
  goes there (:class:`RemoteRejoiner`), and every API server's ``/resilience/status`` shows
  the same rejoin records, read from there.

Every socket is a CURVE server or client of the instance (``transport/curve.py``) and every
message one of the project's wire format (``transport/wire.py``); a results' payload too
large for a header (a survivor's probe of a large model) travels msgpack-encoded in a byte
frame. A malformed message is dropped and counted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import time
from typing import Any

import msgpack
import torch
import zmq

from resilient_ep.transport import curve, wire
from resilient_ep.transport.loops import ReceiveLoop

from .instance import join_instance

__all__ = ["EngineCallRelay", "call_engine", "RejoinService", "RemoteRejoiner",
           "relay_endpoints", "rejoin_endpoint"]

log = logging.getLogger("vllm." + __name__)

PING_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0
SNAPSHOT_TIMEOUT_S = 3.0
"""How long an API server's status waits for the launcher's rejoin records (a launcher on a
busy machine can take a second) before it shows the last known ones, marked stale."""
RELAY_PREFIX = "engine-calls-"
MAX_PAYLOAD = 256 << 20


def relay_endpoint(instance: str, index: int) -> str:
    return f"ipc://{join_instance(instance)}/{RELAY_PREFIX}{int(index)}"


def relay_endpoints(instance: str) -> list[str]:
    """The relays of the instance's API servers now (their sockets), lowest index first."""
    root = join_instance(instance)
    found = []
    for name in os.listdir(root):
        if name.startswith(RELAY_PREFIX) and name[len(RELAY_PREFIX):].isdigit():
            found.append(int(name[len(RELAY_PREFIX):]))
    return [f"ipc://{root}/{RELAY_PREFIX}{i}" for i in sorted(found)]


def rejoin_endpoint(instance: str) -> str:
    return f"ipc://{join_instance(instance)}/rejoin"


def _pack(header: dict[str, Any], payload: Any = None) -> list:
    if payload is None:
        return wire.encode(header)
    raw = msgpack.packb(payload, use_bin_type=True, default=_plain)
    return wire.encode(dict(header, payload=True), [torch.frombuffer(bytearray(raw),
                                                                     dtype=torch.uint8)])


def _plain(obj):
    """What msgpack cannot pack itself, as plain data (tuples are lists already)."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _unpack(frames: list) -> tuple[dict[str, Any], Any]:
    header, tensors = wire.decode(frames)
    payload = None
    if header.get("payload"):
        if len(tensors) != 1 or tensors[0].numel() > MAX_PAYLOAD:
            raise wire.WireError("tensors", "a payload is one byte frame of at most "
                                            f"{MAX_PAYLOAD} bytes")
        payload = msgpack.unpackb(tensors[0].numpy().tobytes(), raw=False,
                                  strict_map_key=False)
    return header, payload


def allowed(utility: str, args: list) -> bool:
    """What a relay makes: our utilities and our worker methods, nothing of vLLM's own (an
    insider with the key still cannot drive the engines through it)."""
    if utility == "collective_rpc":
        return bool(args) and isinstance(args[0], str) and args[0].startswith("resilient_ep_")
    return utility.startswith("resilient_ep_")


# ---------------------------------------------------------------------- API server side
class EngineCallRelay(ReceiveLoop):
    """An API server's relay: engine-core utility calls from the launcher, made through this
    API server's engine client ``client`` on its event loop."""

    loop_name = "engine-call relay"

    def __init__(self, client: Any, instance: str, index: int):
        super().__init__(f"resilient-ep-relay-{index}")
        self.client = client
        self.endpoint = relay_endpoint(instance, index)

    def _serve(self) -> None:
        sock = curve.server(zmq.Context.instance().socket(zmq.ROUTER))
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        done: queue.Queue = queue.Queue()
        pending: dict[Any, tuple[bytes, Any, float]] = {}
        try:
            while not self._stop.is_set():
                if sock.poll(50):
                    who, *frames = sock.recv_multipart()
                    self._take(sock, who, frames, done, pending)
                now = time.monotonic()
                for fut, (who, call_id, deadline) in list(pending.items()):
                    if now > deadline and not fut.done():
                        fut.cancel()  # the caller gave up long ago
                while not done.empty():
                    who, call_id, fut = done.get()
                    pending.pop(fut, None)
                    sock.send_multipart([who, *self._reply(call_id, fut)])
        finally:
            sock.close(linger=0)

    def _take(self, sock, who: bytes, frames: list, done: queue.Queue, pending: dict) -> None:
        try:
            header, _ = _unpack(frames)
            kind = header["t"]
            call_id = int(header["id"])
            if kind == "ping":
                sock.send_multipart([who, *_pack({"t": "pong", "id": call_id})])
                return
            if kind != "call":
                raise ValueError(f"unknown message {kind!r}")
            engine, utility = int(header["engine"]), str(header["utility"])
            args = list(header["args"])
            timeout_s = float(header["timeout_s"])
            c = self.client
            if not 0 <= engine < len(c.core_engines):
                raise ValueError(f"engine {engine} out of range")
            if not allowed(utility, args):
                raise ValueError(f"{utility} {args[:1]} is not a rejoin's call")
        except wire.WireError as e:
            self.dropped[e.reason] += 1
            return
        except wire.BAD_CONTENT:
            self.dropped["fields"] += 1
            return
        loop = c._re_loop
        if loop is None or loop.is_closed():
            sock.send_multipart([who, *_pack({"t": "result", "id": call_id, "ok": False,
                                              "error": "the API server's loop is not up"})])
            return
        fut = asyncio.run_coroutine_threadsafe(
            c._call_utility_async(utility, *args, engine=c.core_engines[engine]), loop)
        pending[fut] = (who, call_id, time.monotonic() + timeout_s + 5.0)
        fut.add_done_callback(lambda f: done.put((who, call_id, f)))

    @staticmethod
    def _reply(call_id: int, fut) -> list:
        if fut.cancelled():
            return _pack({"t": "result", "id": call_id, "ok": False, "error": "cancelled"})
        err = fut.exception()
        if err is not None:
            return _pack({"t": "result", "id": call_id, "ok": False,
                          "error": f"{type(err).__name__}: {err}"[:2000]})
        try:
            return _pack({"t": "result", "id": call_id, "ok": True}, fut.result())
        except (TypeError, ValueError) as e:
            return _pack({"t": "result", "id": call_id, "ok": False,
                          "error": f"result not sendable: {e}"})


# ---------------------------------------------------------------------- launcher side
_ids = itertools.count(1)


def _ask(endpoint: str, header: dict[str, Any], timeout_s: float, lost=None):
    """Send ``header`` to ``endpoint`` and wait for the reply with the same id; (header,
    payload). ``lost()`` true gives up early (``EngineLost``)."""
    from .rejoin import EngineLost

    call_id = next(_ids)
    sock = curve.client(zmq.Context.instance().socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(_pack(dict(header, id=call_id)), flags=zmq.NOBLOCK)
        deadline = time.monotonic() + timeout_s
        while True:
            if sock.poll(100):
                try:
                    reply, payload = _unpack(sock.recv_multipart())
                    if int(reply["id"]) == call_id:
                        return reply, payload
                except (wire.WireError, *wire.BAD_CONTENT):
                    continue
            if lost is not None and lost():
                raise EngineLost(f"{header.get('utility') or header.get('t')}: the engine was "
                                 "lost before it answered")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {endpoint} within {timeout_s:.1f} s")
    except zmq.Again:
        raise TimeoutError(f"{endpoint} takes no message") from None
    finally:
        sock.close(linger=0)


def call_engine(instance: str, engine: int, utility: str, args: tuple, timeout_s: float, *,
                lost=None) -> Any:
    """An engine-core utility call on DP rank ``engine``, made through the first API
    server's relay that answers a ping; its result."""
    errors = []
    for endpoint in relay_endpoints(instance):
        try:
            _ask(endpoint, {"t": "ping"}, PING_TIMEOUT_S)
        except TimeoutError as e:
            errors.append(str(e))
            continue
        reply, payload = _ask(endpoint, {"t": "call", "engine": int(engine), "utility": utility,
                                         "args": list(args), "timeout_s": float(timeout_s)},
                              timeout_s, lost)
        if not reply.get("ok"):
            raise RuntimeError(f"DP{engine} {utility}: {reply.get('error')}")
        return payload
    raise RuntimeError(f"no API server relays engine calls for instance {instance} "
                       f"({'; '.join(errors) or 'none started'})")


class RejoinService(ReceiveLoop):
    """The launcher's rejoin desk: ``rejoin`` (start one; the record, or the reason it
    cannot be done) and ``rejoins`` (every record, and the joins), for the API servers."""

    loop_name = "rejoin service"

    def __init__(self, rejoiner: Any, host: Any, instance: str):
        super().__init__("resilient-ep-rejoin-service")
        self.rejoiner, self.host = rejoiner, host
        self.endpoint = rejoin_endpoint(instance)

    def _serve(self) -> None:
        from .rejoin import RejoinError

        sock = curve.server(zmq.Context.instance().socket(zmq.ROUTER))
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                who, *frames = sock.recv_multipart()
                try:
                    header, _ = _unpack(frames)
                    kind, call_id = header["t"], int(header["id"])
                    if kind == "rejoin":
                        rank, reason = int(header["rank"]), str(header.get("reason", "api"))
                    elif kind != "rejoins":
                        raise ValueError(f"unknown message {kind!r}")
                except wire.WireError as e:
                    self.dropped[e.reason] += 1
                    continue
                except wire.BAD_CONTENT:
                    self.dropped["fields"] += 1
                    continue
                reply: dict[str, Any] = {"t": "answer", "id": call_id, "ok": True}
                if kind == "rejoin":
                    try:
                        body = self.rejoiner.request(rank, reason)
                    except RejoinError as e:
                        reply.update(ok=False, error=str(e))
                        body = None
                else:
                    body = {"rejoins": self.rejoiner.status(), "joins": list(self.host.joins)}
                sock.send_multipart([who, *_pack(reply, body)])
        finally:
            sock.close(linger=0)


class RemoteRejoiner:
    """An API server's handle on the launcher's :class:`RejoinService` (same ``request`` /
    ``status`` as a :class:`~.rejoin.Rejoiner`)."""

    def __init__(self, instance: str):
        self.endpoint = rejoin_endpoint(instance)
        self._last: dict[str, Any] = {"rejoins": [], "joins": []}

    def request(self, rank: int, reason: str = "api") -> dict[str, Any]:
        from .rejoin import RejoinError

        try:
            reply, body = _ask(self.endpoint, {"t": "rejoin", "rank": int(rank),
                                               "reason": reason}, REQUEST_TIMEOUT_S)
        except TimeoutError as e:
            raise RejoinError(f"the launcher's rejoin service did not answer: {e}") from None
        if not reply.get("ok"):
            raise RejoinError(str(reply.get("error")))
        return body

    def snapshot(self) -> dict[str, Any]:
        """The launcher's rejoin records and joins; the last known ones, marked ``stale``,
        if it does not answer within :data:`SNAPSHOT_TIMEOUT_S`."""
        try:
            _, body = _ask(self.endpoint, {"t": "rejoins"}, SNAPSHOT_TIMEOUT_S)
            if isinstance(body, dict):
                self._last = body
                return dict(body, stale=False)
        except TimeoutError:
            log.warning("resilient-ep: the launcher's rejoin service did not answer; showing "
                        "the last known rejoins")
        return dict(self._last, stale=True)

    def status(self) -> list[dict[str, Any]]:
        return list(self.snapshot().get("rejoins") or [])
