"""Request bodies are checked before any rank sees them: every bad field gets a 400 naming it,
and no body, however odd, raises anything but ApiError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_ep.apps.completions import ApiError, parse_completion

VOCAB, CTX = 1000, 64


def _parse(body):
    return parse_completion(body, lambda text: [len(w) for w in text.split()], vocab_size=VOCAB,
                            max_len=CTX)


def test_good_bodies():
    r = _parse({"prompt": [1, 2, 3], "max_tokens": 4, "stream": True, "temperature": 0.0,
                "top_p": 1, "n": 1, "stop": None, "logprobs": None, "user": "u", "seed": 3})
    assert (r.prompt_ids, r.max_tokens, r.stream) == ([1, 2, 3], 4, True)
    assert _parse({"prompt": ["a bb ccc"]}).prompt_ids == [1, 2, 3]


@pytest.mark.parametrize("body, param", [
    ([1, 2], None),
    ({"prompt": [VOCAB]}, "prompt"), ({"prompt": [-1]}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [True]}, "prompt"), ({"prompt": [1.0]}, "prompt"), ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"), ({"prompt": [1], "max_tokens": True}, "max_tokens"),
    ({"prompt": [1], "max_tokens": CTX}, "max_tokens"),
    ({"prompt": [1], "max_tokens": "3"}, "max_tokens"),
    ({"prompt": [1], "stream": "false"}, "stream"), ({"prompt": [1], "stream": 1}, "stream"),
    ({"prompt": [1], "temperature": 0.5}, "temperature"),
    ({"prompt": [1], "temperature": False}, "temperature"),
    ({"prompt": [1], "n": 2}, "n"), ({"prompt": [1], "stop": "x"}, "stop"),
    ({"prompt": [1], "logprobs": 0}, "logprobs"), ({"prompt": [1], "echo": True}, "echo"),
    ({"prompt": [1], "presence_penalty": 1}, "presence_penalty"),
    ({"prompt": [1], "guided_json": {}}, "guided_json"),
])
def test_bad_bodies_name_the_field(body, param):
    with pytest.raises(ApiError) as e:
        _parse(body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                     | st.text(max_size=10),
                     lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c,
                                                                          max_size=5),
                     max_leaves=20)
_fields = st.sampled_from(["prompt", "max_tokens", "stream", "temperature", "top_p", "n",
                           "stop", "logprobs", "echo", "model", "seed", "x"])


@settings(max_examples=500, deadline=None)
@given(st.one_of(_json, st.dictionaries(_fields, _json, max_size=6)))
def test_any_body_is_parsed_or_refused_cleanly(body):
    try:
        r = _parse(body)
    except ApiError as e:
        assert e.status == 400
        return
    assert r.prompt_ids and all(0 <= t < VOCAB for t in r.prompt_ids)
    assert 1 <= r.max_tokens and len(r.prompt_ids) + r.max_tokens <= CTX
    assert isinstance(r.stream, bool)
