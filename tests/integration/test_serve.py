"""``resilient-ep serve``: the OpenAI-compatible API (FastAPI + uvicorn), a stream that
survives a killed rank (read by the ``openai`` client too), a client that goes away cancelling
its request, the API key, ``/metrics``, and Ctrl-C stopping every process."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from resilient_ep.config import ResilienceConfig
from resilient_ep.runtime.coordinator import Coordinator
from resilient_ep.apps.server import serve_in_thread

pytestmark = pytest.mark.integration


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read())


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def api(model_dir):
    cfg = ResilienceConfig().with_overrides(["placement.redundant_slots_per_rank=2",
                                             "detector.heartbeat_timeout_ms=3000"])
    coord = Coordinator(model_dir, num_ranks=4, config=cfg).start()
    server = serve_in_thread(coord, model_dir, "tiny")
    yield server.url, coord
    server.stop()
    coord.shutdown()


def test_models_and_status(api):
    base, coord = api
    status, body = _get(base + "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny"
    status, st = _get(base + "/resilience/status")
    assert set(st) >= {"epoch", "ranks", "uncovered_experts"}
    assert [r["pid"] for r in st["ranks"]] == coord.pids
    assert all(r["state"] == "live" for r in st["ranks"])


@pytest.mark.parametrize("body, param", [
    pytest.param({"prompt": "the cat", "temperature": 0.7}, "temperature", id="sampling"),
    pytest.param({"prompt": "the cat", "max_tokens": 0}, "max_tokens", id="max_tokens_zero"),
    pytest.param({"prompt": 42}, "prompt", id="prompt_type"),
    pytest.param({"prompt": "the", "model": "other"}, "model", id="unknown_model"),
    pytest.param({"prompt": [1000000000]}, "prompt", id="token_outside_vocabulary"),
    pytest.param({"prompt": [True, False]}, "prompt", id="booleans_as_tokens"),
    pytest.param({"prompt": "the", "stream": "false"}, "stream", id="stream_string"),
    pytest.param({"prompt": "the", "stop": ["."]}, "stop", id="stop_unsupported"),
    pytest.param({"prompt": "the", "logprobs": 2}, "logprobs", id="logprobs_unsupported"),
    pytest.param({"prompt": "the", "top_p": 0.5}, "top_p", id="top_p_unsupported"),
])
def test_bad_requests_name_the_field(api, body, param):
    base, _ = api
    status, raw = _post(base + "/v1/completions", body)
    err = json.loads(raw)["error"]
    assert status in (400, 404) and err["param"] == param and param in err["message"]


def test_bad_framing_is_a_clean_error_and_the_server_serves_on(api):
    import http.client
    from urllib.parse import urlparse

    base, coord = api
    u = urlparse(base)
    for length in ("abc", "-5", str(1 << 30)):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", length)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        if length.isdigit():  # well-framed but too large: the app's OpenAI error
            assert r.status == 413 and "Content-Length" in json.loads(body)["error"]["message"]
        else:  # malformed framing: uvicorn answers 400 before the app sees the request
            assert r.status == 400, (length, r.status, body)
        conn.close()
    status, raw = _post(base + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 2})
    assert status == 200 and len(json.loads(raw)["choices"][0]["token_ids"]) == 2
    assert coord.status()["epoch"] == 0, "no rank saw a bad request"


def test_completion_and_stream_survive_a_killed_rank(api, reference, prompts):
    base, coord = api
    status, raw = _post(base + "/v1/completions", {"prompt": prompts[0], "max_tokens": 24})
    body = json.loads(raw)
    assert status == 200 and body["choices"][0]["token_ids"] == reference[0][:len(body["choices"][0]["token_ids"])]
    assert body["usage"]["completion_tokens"] == len(body["choices"][0]["token_ids"])
    # Stream several requests; kill a rank while they stream; every stream completes with the
    # tokens of the failure-free run.
    results = {}

    def stream(i):
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(
            {"prompt": prompts[i], "max_tokens": 24, "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        chunks = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        results[i] = chunks

    def stream_openai(i):  # the real client, as users run it
        import openai

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                               timeout=120)
        results[i] = [{"choices": [{"text": c.choices[0].text,
                                    "finish_reason": c.choices[0].finish_reason}]}
                      for c in client.completions.create(model="tiny", prompt=prompts[i],
                                                         max_tokens=24, stream=True)]

    threads = [threading.Thread(target=stream if i % 2 else stream_openai, args=(i,))
               for i in range(1, 9)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(len(r.generated) for r in coord.requests.values()) < 24 + 8 * 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    coord.kill(3)
    for t in threads:
        t.join(120)
    assert coord.status()["ranks"][3]["state"] == "dead"
    from tokenizers import Tokenizer
    from pathlib import Path
    tok = Tokenizer.from_file(str(Path(coord.model_dir) / "tokenizer.json"))
    eos = json.loads((Path(coord.model_dir) / "config.json").read_text())["eos_token_id"]
    for i in range(1, 9):
        chunks = results[i]
        ref = reference[i][:reference[i].index(eos) + 1] if eos in reference[i] else reference[i]
        assert chunks[-1]["choices"][0]["finish_reason"] == ("stop" if eos in ref else "length")
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == tok.decode(ref)


def test_metrics_after_the_failover(api):
    base, coord = api
    # The stall is known once every survivor that was serving has stepped again (then for
    # good); with nothing left to run, a survivor may never step again.
    end = time.monotonic() + 10
    while coord.recovery_stall(coord.failures[0]) is None and time.monotonic() < end:
        time.sleep(0.05)
    known = coord.recovery_stall(coord.failures[0]) is not None
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    eng = ("engine", "reference")
    assert got[("resilient_ep_live_ranks", (eng,))] == 3
    assert got[("resilient_ep_membership_epoch", (eng,))] == coord.status()["epoch"] >= 1
    assert got[("resilient_ep_failovers_total", (eng, ("kind", "crash")))] == 1
    # (the victim may have owned no request at that moment: compare with the records)
    assert got[("resilient_ep_requests_migrated_total", (eng,))] == sum(
        f.migrated for f in coord.failures)
    assert got[("resilient_ep_stall_seconds_count", (eng,))] == int(known)
    assert got[("resilient_ep_detection_seconds_count", (eng,))] == 1
    assert (0 < got[("resilient_ep_stall_seconds_sum", (eng,))] < 30) == known


def _pending(coord, prompt):
    recs = [r for r in list(coord.requests.values()) if r.prompt == prompt and not r.finished]
    return recs[0] if recs else None


def _wait_until(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "blocking"])
def test_a_client_that_goes_away_cancels_its_request(api, stream):
    import http.client
    from urllib.parse import urlparse

    base, coord = api
    u = urlparse(base)
    prompt = [11, 12, 13, 14, 15 + int(stream)]
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": prompt, "max_tokens": 400, "stream": stream}),
        {"Content-Type": "application/json"})
    _wait_until(lambda: (r := _pending(coord, prompt)) is not None and len(r.generated) >= 3)
    rec = _pending(coord, prompt)
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    _wait_until(lambda: rec.finished)
    assert rec.error == "cancelled" and len(rec.generated) < 400
    # The rank stopped working on it: no step of any rank after a short grace period.
    time.sleep(0.3)
    steps = len(coord.steps)
    time.sleep(0.5)
    assert len(coord.steps) == steps


def test_api_key_and_openai_error_bodies(api, model_dir):
    _, coord = api
    server = serve_in_thread(coord, model_dir, "tiny", api_key="sekrit")
    try:
        for path in ("/v1/models", "/resilience/status"):
            try:
                urllib.request.urlopen(server.url + path, timeout=30)
                pytest.fail(f"{path} answered without the API key")
            except urllib.error.HTTPError as e:
                assert e.code == 401 and "API key" in json.loads(e.read())["error"]["message"]
        req = urllib.request.Request(server.url + "/v1/models",
                                     headers={"Authorization": "Bearer sekrit"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        assert _get(server.url + "/health")[0] == 200  # probes need no key
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
            assert r.status == 200
        import openai

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit", max_retries=0)
        out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3)
        assert out.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong",
                          max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0.5)
        assert e.value.body["param"] == "temperature"
    finally:
        server.stop()
    status, raw = _post(_base_of(api) + "/v2/nothing", {})
    assert status == 404 and json.loads(raw)["error"]["code"] == 404


def _base_of(api):
    return api[0]


def test_cli_serve_ctrl_c_stops_every_process(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "resilient_ep.apps.cli", "serve", str(model_dir),
                             "--ranks", "2", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pids, url = None, None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            m = re.search(r"on (http://127\.0\.0\.1:\d+) \(ranks \[([\d, ]+)\]\)", line)
            if m:
                url, pids = m.group(1), [int(x) for x in m.group(2).split(",")]
                break
            assert time.monotonic() < deadline
        assert url, "server did not start"
        assert _get(url + "/v1/models")[0] == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        for pid in pids:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"rank process {pid} outlived Ctrl-C")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
