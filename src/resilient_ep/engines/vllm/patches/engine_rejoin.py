"""Ledger entry ``vllm-engine-rejoin`` (patches/vllm-engine-rejoin.md).

Why: a replacement engine core for a lost DP rank (``joining.py``) must come up next to
running ranks. vLLM's ``DPEngineCoreProc._init_data_parallel`` forms a gloo group of every
engine core (``stateless_init_dp_group``): a late process would wait for peers that formed
theirs long ago. And ``_handle_client_request`` would start the replacement's busy loop on the
coordinator's ``START_DP_WAVE`` before it has joined.

How (only in a process with ``RESILIENT_EP_REJOIN`` set, i.e. a replacement, or for the
join wake-ups of any failover-enabled engine): ``_init_data_parallel`` sets the DP rank and
size and no DP group (its only per-step use, the busy sum, runs on the failover group);
``_handle_client_request`` ignores ``START_DP_WAVE`` until the replacement joined, holds a
request that reaches it before its flip (the front end routes to it from its admission on;
run on the solo groups, the request would miss the survivors' experts) unless the admission
is known here already, which flips it first (:meth:`~resilient_ep.engines.vllm.joining.
EngineJoin.before_request`), hands the held requests on once joined, and after each
``WAKEUP`` lets the engine act on a join it heard of
(:meth:`~resilient_ep.engines.vllm.joining.EngineJoin.on_wake`). Otherwise the originals run.
"""

from __future__ import annotations

import functools

from . import check_version, expect_signature, is_marked, mark

NAME = "vllm-engine-rejoin"
TARGET_MODULE = "vllm.v1.engine.core"


def _target():
    from vllm.v1.engine.core import DPEngineCoreProc

    return DPEngineCoreProc


def check() -> None:
    check_version(NAME)
    cls = _target()
    expect_signature(NAME, cls._init_data_parallel, ("self", "vllm_config"))
    expect_signature(NAME, cls._handle_client_request, ("self", "request_type", "request"))
    from vllm.v1.engine import EngineCoreRequestType

    for name in ("START_DP_WAVE", "WAKEUP"):
        if not hasattr(EngineCoreRequestType, name):
            from . import PatchError

            raise PatchError(f"{NAME}: EngineCoreRequestType has no {name}")


def is_applied() -> bool:
    return is_marked(_target().__dict__.get("_init_data_parallel"), NAME)


def apply() -> None:
    cls = _target()
    orig_init = cls.__dict__["_init_data_parallel"]
    if is_marked(orig_init, NAME):
        return
    orig_handle = cls.__dict__["_handle_client_request"]

    @functools.wraps(orig_init)
    def _init_data_parallel(self, vllm_config):
        from ..replacement import is_replacement

        if not is_replacement():
            return orig_init(self, vllm_config)
        pc = vllm_config.parallel_config
        self.dp_rank, self.dp_size = int(pc.data_parallel_rank), int(pc.data_parallel_size)
        self.dp_group, self.dp_store = None, None  # the engine-core failover group sums

    @functools.wraps(orig_handle)
    def _handle_client_request(self, request_type, request):
        from vllm.v1.engine import EngineCoreRequestType

        from ..instance import failover_enabled

        if not failover_enabled(self.vllm_config):
            return orig_handle(self, request_type, request)
        from ..joining import engine_join

        join = engine_join(self)
        if not join.joined:  # a replacement, before its flip
            if request_type == EngineCoreRequestType.START_DP_WAVE:
                return None  # it steps only once it has joined
            if request_type == EngineCoreRequestType.ADD:
                if not join.before_request("add", request[0].request_id,
                                           (request_type, request)):
                    return None  # held: it would run without the survivors' experts
            elif request_type == EngineCoreRequestType.ABORT:
                join.before_request("abort", list(request), None)
        out = orig_handle(self, request_type, request)
        if request_type == EngineCoreRequestType.WAKEUP:
            join.on_wake()
        for held_type, held in join.take_held():  # joined now: what it held, in order
            orig_handle(self, held_type, held)
        return out

    cls._init_data_parallel = mark(_init_data_parallel, NAME, orig_init)
    cls._handle_client_request = mark(_handle_client_request, NAME, orig_handle)
