"""The tokenizer manager routes requests and re-admits a lost rank's requests (failover path;
``HookRegistry`` hooks, not a ledger entry).

Why: SGLang's DP controller spreads requests over the DP ranks on its own and nobody keeps
track of which rank runs which request, so a lost rank's requests would simply never finish.

How (SGLang's ``HookRegistry``; the logic is ``frontend.Frontend``):
- ``TokenizerManager._send_one_request`` / ``_send_batch_request`` (BEFORE): each generate
  request gets its DP rank (``routed_dp_rank``, honoured by SGLang's DP controller) from the
  front end, which records it;
- ``TokenizerManager._handle_batch_output`` (AROUND): outputs of a re-admitted request's new
  incarnation are delivered under the original request id (token counts as seen by the
  client); outputs still arriving from a lost rank are dropped; finished requests are
  forgotten;
- ``TokenizerManager.abort_request`` / ``_handle_abort_req`` (AROUND): an abort reaches the
  incarnation in flight, and its answer the original request.
"""

from __future__ import annotations

from . import check_version, expect_signature, hooks_installed, install_hooks, unwrapped

NAME = "sglang-tokenizer-failover"
TARGET_MODULE = "sglang.srt.managers.tokenizer_manager"
_CLS = f"{TARGET_MODULE}.TokenizerManager"



def check() -> None:
    check_version(NAME)
    from sglang.srt.managers.tokenizer_manager import TokenizerManager as T

    for name, params in {"_send_one_request": ("self", "tokenized_obj"),
                         "_send_batch_request": ("self", "tokenized_objs"),
                         "_handle_batch_output": ("self", "recv_obj"),
                         "abort_request": ("self", "rid", "abort_all"),
                         "_handle_abort_req": ("self", "recv_obj")}.items():
        expect_signature(NAME, unwrapped(getattr(T, name)), params)


def _frontend():
    from ..frontend import current_frontend

    return current_frontend()


def _is_generate(obj) -> bool:
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput

    return isinstance(obj, TokenizedGenerateReqInput)


def before_send_one(self, tokenized_obj):
    fe = _frontend()
    if fe is not None and _is_generate(tokenized_obj):
        fe.route(self, tokenized_obj)
    return None


def before_send_batch(self, tokenized_objs):
    fe = _frontend()
    if fe is not None:
        for obj in tokenized_objs:
            if _is_generate(obj):
                fe.route(self, obj)
    return None


async def handle_batch_output(original, self, recv_obj):
    fe = _frontend()
    if fe is None or not getattr(recv_obj, "rids", None):
        return await original(self, recv_obj)
    fe.remap_outputs(recv_obj)
    if fe.failovers and fe.failovers[-1]["first_output_monotonic"] is None and any(
            rid in fe.incarnation for rid in recv_obj.rids):
        fe.first_output()
    await original(self, recv_obj)
    fe.finished(recv_obj)


def abort_request(original, self, rid="", abort_all=False):
    out = original(self, rid, abort_all)
    fe = _frontend()
    inc = fe.incarnation_of(rid) if fe is not None and rid else None
    if inc is not None:
        from sglang.srt.managers.io_struct import AbortReq

        self._dispatch_to_scheduler(AbortReq(rid=inc))
    return out


def handle_abort_req(original, self, recv_obj):
    fe = _frontend()
    base = fe.base_of.get(recv_obj.rid) if fe is not None else None
    if base is not None:
        import msgspec

        if fe.incarnation.get(base) != recv_obj.rid:
            return None  # an older incarnation's answer
        recv_obj = msgspec.structs.replace(recv_obj, rid=base)
    out = original(self, recv_obj)
    if fe is not None:
        fe.forget(recv_obj.rid)
    return out


HOOKS = ((f"{_CLS}._send_one_request", before_send_one, "BEFORE"),
         (f"{_CLS}._send_batch_request", before_send_batch, "BEFORE"),
         (f"{_CLS}._handle_batch_output", handle_batch_output, "AROUND"),
         (f"{_CLS}.abort_request", abort_request, "AROUND"),
         (f"{_CLS}._handle_abort_req", handle_abort_req, "AROUND"))


def is_applied() -> bool:
    return hooks_installed(HOOKS)


def apply() -> None:
    install_hooks(NAME, HOOKS)
