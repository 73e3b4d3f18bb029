"""The front end's request side without an engine: routing to the least-loaded live rank,
re-admission of a lost rank's requests as new incarnations (SGLang's own request structs),
their outputs delivered under the original id, stale outputs dropped, poison requests failed."""

from __future__ import annotations

import asyncio
import os
from array import array
from types import SimpleNamespace

import pytest

from resilient_ep.engines.sglang import config
from resilient_ep.liveness import RankLoss


@pytest.fixture
def frontend(monkeypatch):
    settings = config.normalize({"overrides": ["recovery.max_request_failures=2"]})
    monkeypatch.setenv(config.ENV, __import__("json").dumps(settings))
    from resilient_ep.engines.sglang.frontend import Frontend

    procs = {r: SimpleNamespace(pid=os.getpid(), sentinel=None, exitcode=None) for r in range(3)}
    fe = Frontend(procs, start_monitor=False)
    yield fe
    fe.monitor.stop()


def _request(rid: str, prompt: list[int], max_new: int):
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    return TokenizedGenerateReqInput(
        rid=rid, input_text=None, input_ids=array("q", prompt), input_embeds=None,
        mm_inputs=None, token_type_ids=None,
        sampling_params=SamplingParams(max_new_tokens=max_new, temperature=0.0),
        return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        token_ids_logprob=None, stream=True)


class _TM:
    """What the front end uses of SGLang's TokenizerManager."""

    def __init__(self):
        self.rid_to_state, self.sent, self.aborted = {}, [], []

    async def _send_one_request(self, obj):
        self.sent.append(obj)

    def _handle_abort_req(self, req):
        self.aborted.append(req)


def _lose(fe, rank: int, epoch: int) -> None:
    fe.membership.fail([rank])

    async def go():
        fe._failover(RankLoss(rank=rank, cause="exit", exitcode=-9, detected_monotonic=0.0,
                              epoch=epoch), 0.0)
        await asyncio.sleep(0)

    asyncio.run(go())


def test_route_readmit_remap_and_poison(frontend):
    fe, tm = frontend, _TM()
    reqs = {rid: _request(rid, [5, 6, 7], 10) for rid in ("a", "b", "c", "d")}
    for rid, obj in reqs.items():
        fe.route(tm, obj)
        tm.rid_to_state[rid] = SimpleNamespace(output_ids=[], time_stats=None)
    assert [reqs[r].routed_dp_rank for r in "abcd"] == [0, 1, 2, 0]  # least loaded, lowest
    assert fe.in_flight() == {0: 2, 1: 1, 2: 1}
    tm.rid_to_state["b"].output_ids = [11, 12, 13]  # what b's client has received

    _lose(fe, 1, epoch=1)
    (new,) = tm.sent
    assert new.rid == "b@1" and list(new.input_ids) == [5, 6, 7, 11, 12, 13]
    assert new.sampling_params.max_new_tokens == 7 and new.routed_dp_rank == 2  # least work
    assert reqs["b"].sampling_params.max_new_tokens == 10, "the original is left alone"
    assert fe.owner["b"] == new.routed_dp_rank and fe.failovers[-1]["readmitted"] == 1

    # the new incarnation's outputs arrive under "b"; the lost rank's late ones are dropped
    out = SimpleNamespace(rids=["b", "b@1", "c"], completion_tokens=[4, 2, 5],
                          prompt_tokens=[3, 8, 3], finished_reasons=[None, None, {"type": "length"}])
    fe.remap_outputs(out)
    assert out.rids[0] != "b" and out.rids[1:] == ["b", "c"]
    assert out.completion_tokens[1] == 3 + 2 and out.prompt_tokens[1] == 3
    assert fe.dropped_outputs == 1
    fe.finished(out)
    assert "c" not in fe.owner and "b" in fe.owner

    # b's second death: recovery.max_request_failures=2 -> failed with an error, not moved
    tm.sent.clear()
    tm.rid_to_state["b"].output_ids = [11, 12, 13, 14]
    _lose(fe, fe.owner["b"], epoch=2)
    assert "b" not in [s.rid.split("@")[0] for s in tm.sent]
    (abort,) = [a for a in tm.aborted if a.rid == "b"]
    assert "max_request_failures=2" in abort.finished_reason["message"]
    assert fe.poisoned[-1]["request_id"] == "b" and fe.poisoned[-1]["deaths"] == 2
