"""KV checkpoints on real rank processes: a request whose rank dies resumes from its checkpoint,
recomputes at most ``interval_tokens`` tokens, and its output equals the failure-free run; a
corrupted checkpoint falls back to recompute; losing the rank that held a replica re-replicates."""

import json
import time

import pytest

from resilient_ep.config import ResilienceConfig
from resilient_ep.runtime.coordinator import Coordinator
from resilient_ep.runtime.workload import reference_outputs

pytestmark = pytest.mark.integration
TIMEOUT = 120
MAX_TOKENS = 24  # as in conftest.reference
INTERVAL = 4


def _config(*overrides):
    return ResilienceConfig().with_overrides(["placement.redundant_slots_per_rank=2",
                                              f"kv_checkpoint.interval_tokens={INTERVAL}", *overrides])


def _wait(cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _check_restores(c, recs, reference, *, allow_fallback=()):
    for r, ref in zip(recs, reference):
        assert r.error is None, f"{r.rid}: {r.error}"
        assert r.generated == ref, f"{r.rid} (moved {r.migrations}x) differs from the failure-free run"
    moved = [r for r in recs if r.migrations]
    assert moved, "the killed rank owned requests"
    for r in moved:
        info = c.kv.requests.get(r.rid, {})
        assert "recomputed" in info, f"{r.rid} was moved but no restore was reported"
        if r.rid in allow_fallback:
            continue
        if info.get("checksum_mismatches"):
            # The owner died while rewriting this request's last (partial) block in place: the
            # torn block fails its checksum and the restore falls back to the verified prefix,
            # so more than one interval is recomputed (still exact). Seen once in CI with the
            # file store; the in-place tail rewrite is not crash-atomic (known, docs).
            assert info["restored"] + info["recomputed"] >= len(r.prompt), f"{r.rid}: {info}"
            continue
        assert info["restored"] > 0 or len(r.prompt) <= INTERVAL, f"{r.rid}: {info}"
        assert info["recomputed"] <= INTERVAL, f"{r.rid} recomputed {info['recomputed']} tokens: {info}"


def test_kill_mid_decode_restores_from_peer_checkpoints(model_dir, prompts, reference):
    with Coordinator(model_dir, num_ranks=4, config=_config(), block_size=4) as c:
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        _wait(lambda: all(len(r.generated) >= 8 for r in recs), what="8 tokens each")
        victims = [r for r in recs if r.owner == 1 and not r.finished]
        c.kill(1)
        for r in recs:
            r.wait(TIMEOUT)
        status = c.status()
        assert c.errored() is None
    _check_restores(c, recs, reference)
    kv = json.loads(json.dumps(status))["kv_checkpoint"]  # what GET /resilience/status serves
    assert kv["enabled"] and kv["store"] == "peer" and kv["saves"] > 0 and kv["bytes"] > 0
    assert kv["restores"] == len(victims) == kv["restored_from_checkpoint"]
    assert kv["checksum_mismatches"] == 0 and kv["lag_tokens_max_seen"] >= 0
    assert status["epoch"] == 1 and status["ranks"][1]["state"] == "dead"


def test_corrupt_checkpoint_falls_back_to_recompute(model_dir, prompts, reference):
    cfg = _config("kv_checkpoint.store=file")
    with Coordinator(model_dir, num_ranks=4, config=cfg, block_size=4) as c:
        recs = [c.submit(p, MAX_TOKENS) for p in prompts]
        _wait(lambda: all(len(r.generated) >= 8 for r in recs), what="8 tokens each")
        victim = next(r for r in recs if r.owner == 2 and not r.finished)
        _wait(lambda: c.kv.requests.get(victim.rid, {}).get("tokens", 0) >= 8, what="a checkpoint")
        store_dir = c.run_dir / "kv-files" / "store-0"
        data = store_dir / f"{victim.rid.encode().hex()}.kv"
        raw = bytearray(data.read_bytes())
        raw[5] ^= 0xFF  # block 0: never rewritten by later (incremental) saves
        data.write_bytes(bytes(raw))
        c.kill(2)
        for r in recs:
            r.wait(TIMEOUT)
        status = c.status()
        assert c.errored() is None
    _check_restores(c, recs, reference, allow_fallback={victim.rid})
    info = c.kv.requests[victim.rid]
    assert info["restored"] == 0 and info["checksum_mismatches"] == 1
    assert info["recomputed"] >= len(victim.prompt) + 7, "full recompute: prompt and generated tokens"
    kv = status["kv_checkpoint"]
    # The instance-wide counters are the victim's corruption plus any torn tail block of another
    # request the same kill interrupted mid-save (the known limitation _check_restores accepts):
    # they must add up, request by request.
    torn = [c.kv.requests[r.rid] for r in recs if r.rid != victim.rid
            and c.kv.requests.get(r.rid, {}).get("checksum_mismatches")]
    assert kv["store"] == "file"
    assert kv["checksum_mismatches"] == 1 + sum(i["checksum_mismatches"] for i in torn)
    moved = [c.kv.requests[r.rid] for r in recs if r.migrations]
    assert kv["full_recomputes"] == sum(1 for i in moved if i["restored"] == 0)


def test_kill_replica_holder_then_owner(model_dir, prompts):
    # Ring placement with one replica: rank 1 saves on rank 2. Kill rank 2 (rank 1's copies are
    # lost): rank 1 re-replicates on rank 3. Then kill rank 1: its requests restore from rank 3.
    max_tokens = 40
    ref = reference_outputs(model_dir, prompts, max_tokens)
    cfg = _config("recovery.max_request_failures=0")  # two deaths: not a poison request
    with Coordinator(model_dir, num_ranks=4, config=cfg, block_size=4) as c:
        recs = [c.submit(p, max_tokens) for p in prompts]
        _wait(lambda: all(len(r.generated) >= 6 for r in recs), what="6 tokens each")
        on1 = [r for r in recs if r.owner == 1]
        assert all(c.kv.requests.get(r.rid, {}).get("locations") == ["peer:2"] for r in on1)
        c.kill(2)
        _wait(lambda: c.status()["epoch"] >= 1, what="rank 2 declared dead")
        _wait(lambda: all(c.kv.requests.get(r.rid, {}).get("locations") == ["peer:3"]
                          for r in on1 if not r.finished), what="re-replication on rank 3")
        still = [r for r in on1 if not r.finished]
        assert still, "rank 1 still has work when it is killed"
        c.kill(1)
        for r in recs:
            r.wait(TIMEOUT)
        status = c.status()
        assert c.errored() is None
    _check_restores(c, recs, ref)
    for r in still:
        assert c.kv.requests[r.rid]["source"] == "peer:3"
    assert [x["state"] for x in status["ranks"]] == ["live", "dead", "dead", "live"]
