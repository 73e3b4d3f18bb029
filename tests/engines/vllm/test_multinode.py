"""Real vLLM across two "nodes" (network namespaces of the test bed, ``resilient_ep.netbed``):
``resilient-ep serve --engine vllm`` with ``--data-parallel-size 2 --data-parallel-size-local
1 --data-parallel-address <node 0>`` on node 0 (DP rank 0, the API servers) and the same with
``--headless --data-parallel-start-rank 1`` on node 1, DP=2 + EP, ``--enable-resilience`` with
``transport.node_addresses``. Node 1 is lost whole, or cut off; every stream completes with
the tokens of the failure-free run of the same instance, none twice. One instance start per
test (~2 min here)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from vllm_harness import PROMPTS, engine_env, free_port, kill_group, stream_completion

pytestmark = pytest.mark.engine

SERVE_TIMEOUT_S = 480
TOKENS = 600  # still generating when the (lagging) client has seen its first tokens
HANG_TIMEOUT_MS = 2000  # a loaded 2-core machine must not starve a heartbeat that long
BASE_PORT = 25000


@pytest.fixture
def netbed():
    from resilient_ep.netbed import NetBed, netbed_available

    why = netbed_available()
    if why is not None:
        pytest.skip(f"network test bed: {why}")
    bed = NetBed(2).start()
    try:
        yield bed
    finally:
        bed.close()


class NodeServer:
    """``resilient-ep serve --engine vllm`` on one node of the bed, its own process group."""

    def __init__(self, bed, node: int, model, args: list[str], log, env):
        self.model, self.log, self.port = str(model), log, free_port()
        self._f = open(log, "w")
        cmd = [*bed.prefix(node), sys.executable, "-m", "resilient_ep.cli", "serve", str(model),
               "--engine", "vllm", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"  # node 0's loopback (the caller enters it)

    def get(self, path: str, timeout_s: float = 30):
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as r:
            return r.status, r.read()

    def wait_ready(self, timeout_s: float, other=None) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for p in (self, other):
                if p is not None and p.proc.poll() is not None:
                    raise AssertionError(f"a server exited rc={p.proc.returncode}:\n{p.tail()}")
            try:
                if self.get("/health", 2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise AssertionError(f"not ready after {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self._f.flush()
        return self.log.read_text()[-n:]

    def stop(self) -> None:
        kill_group(self.proc)
        self._f.close()


def _start(bed, tiny_model, work):
    key = work / "instance.key"
    from resilient_ep.transport import wire

    wire.new_key_file(key)  # the instance key, at the same path on every node
    common = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1100",
              "--max-num-seqs", "8", "--seed", "0", "--enable-expert-parallel",
              "--data-parallel-size", "2", "--data-parallel-size-local", "1",
              "--data-parallel-address", bed.address(0), "--data-parallel-rpc-port", "13345",
              "--enable-resilience",
              "--resilience-set", "transport.address=tcp",
              "--resilience-set", f"transport.node_addresses=[{', '.join(bed.addresses)}]",
              "--resilience-set", f"transport.base_port={BASE_PORT}",
              "--resilience-set", f"transport.key_file={key}",
              "--resilience-set", f"detector.heartbeat_timeout_ms={HANG_TIMEOUT_MS}"]
    env0 = engine_env(extra={"VLLM_CPU_OMP_THREADS_BIND": "0"})
    env1 = engine_env(extra={"VLLM_CPU_OMP_THREADS_BIND": "1"})
    head = NodeServer(bed, 0, tiny_model, common, work / "head.log", env0)
    node = NodeServer(bed, 1, tiny_model, [*common, "--headless", "--data-parallel-start-rank",
                                           "1"], work / "node1.log", env1)
    return head, node


def _stream_all(server, fail=None, min_tokens: int = 8):
    """Stream every prompt at once; ``fail()`` once every stream has ``min_tokens``."""
    outs = [dict() for _ in PROMPTS]
    threads = [threading.Thread(target=stream_completion, args=(server, p, TOKENS, o))
               for p, o in zip(PROMPTS, outs)]
    for t in threads:
        t.start()
    if fail is not None:
        end = time.monotonic() + 120
        while time.monotonic() < end and not all(len(o.get("tokens", ())) >= min_tokens
                                                 for o in outs):
            time.sleep(0.02)
        assert all(len(o.get("tokens", ())) < TOKENS for o in outs), "finished before the failure"
        fail()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return outs


def _status(server) -> dict:
    return json.loads(server.get("/resilience/status")[1])


def _run(netbed, tiny_model, tmp_path, fail, after=None):
    head, node = _start(netbed, tiny_model, tmp_path)
    try:
        with netbed.entered(0):  # the client threads live on node 0, beside the API servers
            head.wait_ready(SERVE_TIMEOUT_S, other=node)
            status = _status(head)
            assert [r["state"] for r in status["ranks"]] == ["live", "live"]
            clean = _stream_all(head)
            assert all("error" not in o and len(o["tokens"]) == TOKENS for o in clean), clean
            failed = _stream_all(head, fail=lambda: fail(netbed, node))
            status = _status(head)
        for c, f in zip(clean, failed):
            assert "error" not in f, f["error"]
            assert f["tokens"] == c["tokens"], "a stream differs from the failure-free run"
        assert [r["state"] for r in status["ranks"]] == ["live", "dead"], status["ranks"]
        assert [f["dp_rank"] for f in status["failovers"]] == [1], status["failovers"]
        if after is not None:
            after(head, node)
    except BaseException:
        print("--- head ---\n", head.tail(), "\n--- node 1 ---\n", node.tail())
        raise
    finally:
        head.stop()
        node.stop()


def test_a_lost_node_fails_over_to_the_other(netbed, tiny_model, tmp_path):
    """Every process of node 1 SIGKILLed at once: its requests resume on node 0."""
    _run(netbed, tiny_model, tmp_path, lambda bed, node: bed.kill_node(1))


def test_a_partitioned_node_holds_is_fenced_and_serves_nothing_twice(netbed, tiny_model,
                                                                      tmp_path):
    """Node 1's cable cut mid-stream: its engine is cut off (its step waits on its peer; a
    step that completes without a lease hands nothing on), the head fences it after the
    heartbeat timeout and re-admits its requests on node 0. The cable comes back: node 1
    hears of the fence and kills its rank; nothing it computed reaches a client (every stream
    equals the failure-free run, token for token)."""
    def cut(bed, node):
        bed.set_link(1, up=False)
        threading.Timer(HANG_TIMEOUT_MS / 1000 * 3, bed.set_link, args=(1,),
                        kwargs={"up": True}).start()

    def node_stops_its_rank(head, node):
        end = time.monotonic() + 60  # the cable is back: node 1 hears of the fence
        while "was fenced by the head" not in node.tail(200_000) and time.monotonic() < end:
            time.sleep(0.5)
        assert "was fenced by the head" in node.tail(200_000)
        end = time.monotonic() + 60  # ... and its `vllm serve --headless` ends
        while node.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.5)
        assert node.proc.poll() is not None

    _run(netbed, tiny_model, tmp_path, cut, after=node_stops_its_rank)
