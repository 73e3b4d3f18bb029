"""The DP controller routes around a lost rank (failover path; ``HookRegistry`` hooks, not a
ledger entry; the logic is ``dp_controller.py``).

Why: SGLang's DP controller only learns which ranks are active from its own elastic-EP
messages; a lost scheduler stays in its worker list, and a send to it blocks the controller
for ever (a ZeroMQ PUSH socket with no peer left).

How (SGLang's ``HookRegistry``):
- ``DataParallelController.__init__`` (AFTER): follow the instance's membership;
- ``maybe_external_dp_rank_routing`` (AROUND): a request routed by the front end goes to its
  rank with a send that cannot block for ever, or is dropped when the rank is lost;
- ``send_control_message`` / ``dispatch_health_check`` (AROUND): the same sends, to the live
  ranks only.
"""

from __future__ import annotations

from ..instance import failover_on
from . import check_version, expect_signature, hooks_installed, install_hooks, unwrapped

NAME = "sglang-dp-controller-failover"
TARGET_MODULE = "sglang.srt.managers.data_parallel_controller"
_CLS = f"{TARGET_MODULE}.DataParallelController"



def check() -> None:
    check_version(NAME)
    from sglang.srt.managers.data_parallel_controller import DataParallelController as C

    expect_signature(NAME, unwrapped(C.__init__),
                     ("self", "server_args", "port_args", "run_scheduler_process_func",
                      "prelaunched_schedulers"))
    for name in ("maybe_external_dp_rank_routing", "dispatch_health_check"):
        expect_signature(NAME, unwrapped(getattr(C, name)), ("self", "req"))
    expect_signature(NAME, unwrapped(C.send_control_message), ("self", "obj"))



def after_init(result, self, *args, **kwargs):
    if failover_on():
        from sglang.srt.runtime_context import get_parallel

        from ..dp_controller import attach

        attach(self, int(get_parallel().tp_size))
    return result


def external_routing(original, self, req):
    if not failover_on() or getattr(req, "routed_dp_rank", None) is None:
        return original(self, req)
    from ..dp_controller import send

    send(self, int(req.routed_dp_rank), req)
    return True


def control_message(original, self, obj):
    if not failover_on():
        return original(self, obj)
    from ..dp_controller import send

    for rank in list(self._active_workers)[::self.control_message_step]:
        if self.workers[rank] is not None:
            send(self, rank, obj)
    return None


def health_check(original, self, req):
    if not failover_on():
        return original(self, req)
    from ..dp_controller import send

    active = list(self._active_workers)
    if not active:
        raise RuntimeError("No active DP workers are available for health checks.")
    rank = active[self.health_round_robin_counter % len(active)]
    self.health_round_robin_counter = (self.health_round_robin_counter + 1) % len(active)
    send(self, rank, req)
    return None


HOOKS = ((f"{_CLS}.__init__", after_init, "AFTER"),
         (f"{_CLS}.maybe_external_dp_rank_routing", external_routing, "AROUND"),
         (f"{_CLS}.send_control_message", control_message, "AROUND"),
         (f"{_CLS}.dispatch_health_check", health_check, "AROUND"))


def is_applied() -> bool:
    return hooks_installed(HOOKS)


def apply() -> None:
    install_hooks(NAME, HOOKS)
