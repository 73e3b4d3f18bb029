"""The resilient KV connector on real vLLM (CPU): a request's KV is checkpointed through the
core (``resilient_ep.kv``) while it decodes; re-admitted as its prompt plus its output with
``resilient_restore``, it is an external cache hit (every token of its newest checkpoint) and continues
with the tokens of an uninterrupted run. One engine start (~60-120 s here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from resilient_ep.kv.dir_store import default_shm_dir

pytestmark = pytest.mark.engine
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def connector_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv-connector") / "out.json"
    base = default_shm_dir(f"rep-kvconn-{uuid.uuid4().hex[:8]}")
    log = out.with_suffix(".log")
    try:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, str(HERE / "kv_connector_run.py"), str(out),
                                   str(tiny_model), str(base)], stdout=f, stderr=subprocess.STDOUT,
                                  timeout=480)
        assert proc.returncode == 0, log.read_text()[-4000:]
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_readmitted_request_is_an_external_cache_hit_and_continues_the_same(connector_run):
    r = connector_run
    print(f"\n[kv connector] engine start {r['start_s']:.1f} s, restore+16 tokens {r['restore_s']:.2f} s, "
          f"cached tokens {r['a2_num_cached_tokens']}")
    assert r["b"][: len(r["a"])] == r["a"], "greedy and deterministic"
    # 60 prompt + 50 generated tokens (109 computed); a save every 32 computed tokens (60, 92);
    # blocks of 32: the last save's whole blocks (64 tokens) are loaded as an external hit.
    # A's newest checkpoint: after its prefill (60) and one interval (32) more; the last block
    # of it is partial (92 = 2 x 32 + 28) and is restored too
    assert r["a2_num_cached_tokens"] == 92
    assert r["a2"] == r["b"][len(r["a"]):], "the restored request continues like the uninterrupted one"
    assert any(f.endswith(".meta") for f in r["files"]), "checkpoints went to the shm store"
