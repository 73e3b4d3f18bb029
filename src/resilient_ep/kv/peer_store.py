"""The peer store: host memory of another rank, over ZeroMQ.

Each rank runs a :class:`PeerStoreServer` (a thread with a ROUTER socket bound at its endpoint,
serving a :class:`~.store.MemoryStore`); any process reaches it with a :class:`PeerStore`
client (a DEALER; one client per server, used from one thread). A checkpoint on the dying rank
is useless, so an owner saves its replicas on *other* ranks; when a rank dies, its server and
every copy it held go with it, and nothing else.

Messages are :mod:`resilient_ep.transport.wire` frames: a header ``{"op", "id", ...}`` plus
tensor frames; replies echo ``id`` (a late reply to a call that timed out is discarded).
``python -m resilient_ep.kv.peer_store ENDPOINT`` serves one store in its own process
(benchmarks, tests).
"""

from __future__ import annotations

import itertools
from collections import Counter
import sys
import threading
import time

import zmq

from ..transport import curve, wire
from ..transport.loops import run_restarting
from .meta import CheckpointMeta
from .store import CheckpointStore, MemoryStore, StoreError

__all__ = ["PeerStore", "PeerStoreServer", "peer_endpoint"]


def peer_endpoint(run_dir: str, rank: int) -> str:
    return f"ipc://{run_dir}/kvstore-{rank}"


class PeerStoreServer:
    """Serves a :class:`MemoryStore` at ``endpoint`` from a background thread."""

    def __init__(self, endpoint: str, *, location: str = "peer:0", ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.store = MemoryStore(location)
        self.ctx = ctx or zmq.Context.instance()
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kvstore-{location}", daemon=True)
        self.dropped: Counter[str] = Counter()
        """Requests dropped (malformed), by reason."""
        self.restarts = 0
        """Times the loop raised and was started again (``transport/loops.py``)."""
        self.cpu_s = 0.0
        """CPU time the server thread spent handling requests."""

    def start(self, timeout: float = 5.0) -> "PeerStoreServer":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise StoreError(f"peer store server at {self.endpoint} did not start")
        if self._error is not None:
            raise StoreError(f"peer store server at {self.endpoint}: {self._error}")
        return self

    def configure(self, epoch: int, members) -> None:
        self.store.configure(epoch, members)

    def errored(self) -> Exception | None:
        return self._error

    def abort(self) -> None:
        self._stop.set()

    def shutdown(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        self._error = run_restarting(self._serve_once, name=f"KV peer store {self.store.location}",
                                     stop=self._stop, on_restart=self._restarted) or self._error

    def _restarted(self, _e: BaseException) -> None:
        self.restarts += 1

    def _serve_once(self) -> None:
        first = not self._ready.is_set()
        sock = curve.server(self.ctx.socket(zmq.ROUTER))
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            if not first:
                raise  # the address is still held: try again
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        far = time.monotonic() + 1e9
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                cpu0 = time.thread_time()
                ident, *frames = sock.recv_multipart(copy=False)
                try:
                    header, tensors = wire.decode(frames)
                except wire.WireError as e:
                    self.dropped[e.reason] += 1
                    continue  # not a client of ours: no reply
                reply, out = {"id": header.get("id"), "ok": True}, []
                try:
                    op = header["op"]
                    if op == "put":
                        meta = CheckpointMeta.from_dict(header["meta"])
                        self.store.put(meta, header["first"], tensors[0], far, copy=False)
                    elif op == "head":
                        m = self.store.head(header["rid"], far)
                        reply["meta"] = m.to_dict() if m is not None else None
                    elif op == "get":
                        got = self.store.get(header["rid"], far)
                        reply["meta"] = got[0].to_dict() if got is not None else None
                        if got is not None:
                            out = [got[1]]
                    elif op == "delete":
                        self.store.delete(header["rid"], far)
                    elif op == "rids":
                        reply["rids"] = self.store.rids(far)
                    else:
                        raise StoreError(f"unknown op {op!r}")
                except StoreError as e:
                    reply.update(ok=False, error=str(e))
                except wire.BAD_CONTENT as e:
                    self.dropped["fields"] += 1
                    reply.update(ok=False, error=f"malformed {header.get('op')!r} request: "
                                                 f"{type(e).__name__}: {e}"[:200])
                sock.send_multipart([ident.bytes, *wire.encode(reply, out)], copy=False)
                self.cpu_s += time.thread_time() - cpu0
        finally:
            sock.close(linger=0)


class PeerStore(CheckpointStore):
    """Client of one :class:`PeerStoreServer`. Not thread-safe: one thread per client."""

    def __init__(self, endpoint: str, location: str, *, ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.location = location
        self.ctx = ctx or zmq.Context.instance()
        self._ids = itertools.count()
        self.sock = curve.client(self.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a server that is not connected
        self.sock.connect(endpoint)

    def shutdown(self):
        self.sock.close(linger=0)

    def _call(self, header: dict, tensors, deadline: float) -> tuple[dict, list]:
        if self._aborted:
            raise StoreError(f"{self.location}: aborted")
        rid = next(self._ids)
        frames = wire.encode(dict(header, id=rid), list(tensors))
        # With IMMEDIATE, a send to a server that is not (or no longer) connected is refused:
        # wait for the connection until the deadline, as for a reply.
        while True:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                if time.monotonic() > deadline or self._aborted:
                    raise StoreError(f"{self.location}: store at {self.endpoint} is not reachable") from None
                time.sleep(0.002)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._aborted:
                raise TimeoutError(f"{self.location}: no reply from {self.endpoint} to {header['op']}")
            if not self.sock.poll(min(left, 0.05) * 1000):
                continue
            try:
                reply, out = wire.decode(self.sock.recv_multipart(copy=False))
            except wire.WireError:
                continue  # not our server's reply: wait for the real one
            if reply.get("id") != rid:
                continue  # a late reply to an earlier call that timed out
            if reply.get("ok") is not True:
                raise StoreError(f"{self.location}: {reply.get('error')!r:.200}")
            return reply, out

    def put(self, meta, first, blocks, deadline):
        self._call({"op": "put", "meta": meta.to_dict(), "first": first}, [blocks], deadline)

    def head(self, rid, deadline):
        reply, _ = self._call({"op": "head", "rid": rid}, [], deadline)
        return CheckpointMeta.from_dict(reply["meta"]) if reply["meta"] is not None else None

    def get(self, rid, deadline):
        reply, out = self._call({"op": "get", "rid": rid}, [], deadline)
        if reply["meta"] is None:
            return None
        return CheckpointMeta.from_dict(reply["meta"]), out[0]

    def delete(self, rid, deadline):
        self._call({"op": "delete", "rid": rid}, [], deadline)

    def rids(self, deadline):
        return self._call({"op": "rids"}, [], deadline)[0]["rids"]


def main(argv: list[str] | None = None) -> int:
    """Serve one peer store in this process until SIGTERM/SIGKILL."""
    argv = sys.argv[1:] if argv is None else argv
    server = PeerStoreServer(argv[0], location=argv[1] if len(argv) > 1 else "peer:0").start()
    print("ready", flush=True)
    try:
        while server.errored() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
