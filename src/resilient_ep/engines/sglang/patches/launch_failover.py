"""The launcher watches its scheduler processes through the core, not SGLang's watchdog
(failover path; ``HookRegistry`` hooks, not a ledger entry).

Why: SGLang's launcher (``Engine._launch_subprocesses``) hands every scheduler process to a
``SubprocessWatchdog`` that SIGQUITs the launcher, and so stops the whole instance, as soon
as one of them exits.

How: AFTER hook on ``Engine._launch_scheduler_processes``: with DP attention (SGLang starts
the schedulers itself, children of this process) the scheduler processes of a
failover-enabled instance go to the core's liveness monitor (``frontend.start``), rank =
TP rank. BEFORE hook on ``SubprocessWatchdog.__init__``: those processes are taken off the
list it watches (the DP controller and the detokenizer stay on it: losing either still
stops the instance).
"""

from __future__ import annotations

import logging

from . import check_version, expect_signature, hooks_installed, install_hooks, unwrapped

NAME = "sglang-launch-failover"
TARGET_MODULE = "sglang.srt.entrypoints.engine"
_LAUNCH = f"{TARGET_MODULE}.Engine._launch_scheduler_processes"
_WATCHDOG = "sglang.srt.utils.watchdog.SubprocessWatchdog.__init__"

log = logging.getLogger(__name__)

_ranks: set[int] = set()
"""Pids of the scheduler processes our liveness monitor watches."""



def check() -> None:
    check_version(NAME)
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.utils.watchdog import SubprocessWatchdog

    raw = Engine.__dict__["_launch_scheduler_processes"]
    expect_signature(NAME, unwrapped(getattr(raw, "__func__", raw)),
                     ("cls", "server_args", "port_args", "run_scheduler_process_func",
                      "placement_group"))
    expect_signature(NAME, unwrapped(SubprocessWatchdog.__init__),
                     ("self", "processes", "process_names", "interval"))


def after_launch(result, cls, server_args, port_args, run_scheduler_process_func, *,
                 placement_group=None):
    from sglang.srt.runtime_context import get_parallel

    from ..instance import current, failover_enabled
    from ..status import record_schedulers

    if current() is None:
        return result
    _, procs = result
    procs = list(procs or [])
    p = get_parallel()
    schedulers = procs[1:] if len(procs) == p.tp_size + 1 else procs
    record_schedulers({r: int(proc.pid) for r, proc in enumerate(schedulers)})
    if not failover_enabled():
        return result
    # With DP attention SGLang starts the schedulers here, in TP-rank order, and puts the DP
    # controller's process first.
    if len(procs) != p.tp_size + 1:
        log.error("resilient-ep: expected the DP controller and %d scheduler processes, found "
                  "%d processes: failover off", p.tp_size, len(procs))
        return result
    from ..frontend import start

    _ranks.update(int(proc.pid) for proc in schedulers)
    start(dict(enumerate(schedulers)))
    return result


def before_watchdog(self, processes, process_names=None, interval=1.0):
    if not _ranks:
        return None
    keep = [i for i, proc in enumerate(processes) if int(proc.pid) not in _ranks]
    names = ([process_names[i] for i in keep] if process_names is not None else None)
    return (self, [processes[i] for i in keep], names, interval), {}


HOOKS = ((_LAUNCH, after_launch, "AFTER"), (_WATCHDOG, before_watchdog, "BEFORE"))


def is_applied() -> bool:
    return hooks_installed(HOOKS)


def apply() -> None:
    install_hooks(NAME, HOOKS)
