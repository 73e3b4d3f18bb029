"""The resilience switches on SGLang, installed through SGLang's own ``HookRegistry``
(official plugin hooks; no monkeypatch):

- ``ServerArgs.add_cli_args`` (AFTER): adds the Resilience group (``--enable-resilience``,
  ``--resilience-config FILE.yaml``, ``--resilience-set key.sub=value``) to every SGLang parser
  (``python -m sglang.launch_server``, ``sglang serve``);
- ``ServerArgs.from_cli_args`` (AFTER): carries the flags onto the record (``config.ATTR``);
- ``Engine._launch_subprocesses`` (BEFORE): the one place every entry (HTTP server,
  ``Engine``) passes before SGLang starts a subprocess. With resilience on it validates and
  resolves the settings (a bad value fails here, naming the dotted field), checks the
  topology, hands the result to the processes about to start (``config.export``) and
  activates the plugin there and here (``plugin.activate``). With it off it clears what an
  earlier engine of this process may have exported, and changes nothing else.

Each hook checks the upstream signature first (:func:`check`).
"""

from __future__ import annotations

import logging
from ..common.flags import add_resilience_args, fold_flags
from . import config

__all__ = ["install_server_args", "install_engine", "is_installed", "SERVER_ARGS_HOOKS",
           "ENGINE_HOOKS"]

log = logging.getLogger(__name__)

NAME = "sglang-server-args-hooks"
"""Not a ledger entry (official hooks); the name PatchError messages carry."""

_ADD = "sglang.srt.server_args.ServerArgs.add_cli_args"
_FROM = "sglang.srt.server_args.ServerArgs.from_cli_args"
_LAUNCH = "sglang.srt.entrypoints.engine.Engine._launch_subprocesses"
_LAUNCH_PARAMS = ("cls", "server_args", "init_tokenizer_manager_func",
                  "run_scheduler_process_func", "run_detokenizer_process_func", "port_args",
                  "placement_group")

def after_add_cli_args(result, parser):
    add_resilience_args(parser)
    return result


def after_from_cli_args(server_args, cls, args):
    """AFTER hook of the classmethod: (result, cls, args)."""
    section = fold_flags(args, config.settings_of(server_args))
    if section is not None:
        config.attach(server_args, section)
        prepare_record(server_args)
    return server_args


def raw_topology(server_args) -> config.SglangTopology:
    """The parallel layout asked for on an unresolved ``ServerArgs`` (raw fields)."""
    tp = int(getattr(server_args, "tp_size", 1) or 1)
    dp = int(getattr(server_args, "dp_size", 1) or 1)
    attn_dp = int(getattr(server_args, "attn_dp_size", 1) or 1)
    if attn_dp <= 1 and getattr(server_args, "enable_dp_attention", False):
        attn_dp = dp
    return config.SglangTopology(tp_size=tp, dp_size=max(dp, attn_dp),
                                 ep_size=int(getattr(server_args, "ep_size", 1) or 1),
                                 dp_attention=attn_dp > 1)


def prepare_record(server_args) -> dict | None:
    """Validate the settings on an unresolved ``ServerArgs`` and, where failover applies,
    set the SGLang arguments it needs (before SGLang resolves the record): the core's expert
    placement (``experts.launch_settings``) and, so that no weight and no per-step exchange
    spans the whole TP group, each DP rank's own LM head and embedding
    (``enable_dp_lm_head``), unsharded dense MLPs (``moe_dense_tp_size=1``) and the DP
    controller's control fan-out to every DP rank
    (``enable_dp_attention_local_control_broadcast``). What SGLang's DWDP mode forces too.
    Returns the normalized settings (None: off)."""
    import os

    from .instance import FAILOVER_ENV

    settings = config.normalize(config.settings_of(server_args))
    if settings is None:
        return None
    config.attach(server_args, settings)
    topo = raw_topology(server_args)
    if not topo.failover_capable or os.environ.get(FAILOVER_ENV, "1") == "0":
        return settings
    from transformers import AutoConfig

    from resilient_ep.config import ConfigError, ResilienceConfig

    from .experts import launch_settings

    hf = AutoConfig.from_pretrained(server_args.model_path,
                                    trust_remote_code=bool(server_args.trust_remote_code))
    given = {k: getattr(server_args, k) for k in ("ep_num_redundant_experts",
                                                  "init_expert_location",
                                                  "ep_dispatch_algorithm", "enable_eplb")}
    cfg = ResilienceConfig.from_dict({k: v for k, v in settings.items() if k != "instance"})
    for name, value in launch_settings(hf, topo.ep_size, cfg, given).items():
        setattr(server_args, name, value)
    if server_args.moe_dense_tp_size not in (None, 1):
        raise ConfigError("moe_dense_tp_size", server_args.moe_dense_tp_size,
                          "must be 1 with resilience on (a dense MLP sharded over the TP group "
                          "loses its shard with the rank)")
    server_args.moe_dense_tp_size = 1
    server_args.enable_dp_lm_head = True
    server_args.enable_dp_attention_local_control_broadcast = True
    log.info("resilient-ep: failover path on (%s): experts placed by the core (full mirror, "
             "%d redundant slots)", topo.describe(), server_args.ep_num_redundant_experts)
    return settings


def before_launch(cls, server_args, *args, **kwargs):
    from . import plugin

    settings = config.normalize(config.settings_of(server_args))
    if settings is None:
        config.clear_env()
        return None
    topo = config.topology_of(server_args)
    config.attach(server_args, settings)
    config.export(settings)
    plugin.activate()
    from .status import install_route

    install_route()
    log.info("resilient-ep: resilience on (instance %s, %s%s)", settings["instance"],
             topo.describe(), "" if topo.failover_capable else
             "; failover needs --dp-size N --enable-dp-attention --ep-size N with tp N >= 2")
    return None


def _unwrapped(cls: type, name: str):
    from .patches import unwrapped

    raw = cls.__dict__[name]
    return unwrapped(getattr(raw, "__func__", raw))


def check_server_args() -> None:
    from sglang.srt.server_args import ServerArgs

    from .patches import PatchError, check_version, expect_signature

    check_version(NAME)
    expect_signature(NAME, _unwrapped(ServerArgs, "add_cli_args"), ("parser",))
    expect_signature(NAME, _unwrapped(ServerArgs, "from_cli_args"), ("cls", "args"))
    if "__reduce__" not in ServerArgs.__dict__:
        raise PatchError(f"{NAME}: ServerArgs no longer pickles its bookkeeping attributes")


def check_engine() -> None:
    from sglang.srt.entrypoints.engine import Engine

    from .patches import check_version, expect_signature

    check_version(NAME)
    expect_signature(NAME, _unwrapped(Engine, "_launch_subprocesses"), _LAUNCH_PARAMS)


SERVER_ARGS_HOOKS = ((_ADD, after_add_cli_args, "AFTER"), (_FROM, after_from_cli_args, "AFTER"))
ENGINE_HOOKS = ((_LAUNCH, before_launch, "BEFORE"),)


def _install(hooks, check) -> None:
    from .patches import hooks_installed, install_hooks

    if hooks_installed(hooks):
        return
    check()
    install_hooks(NAME, hooks)


def install_server_args() -> None:
    """The flag hooks (when ``sglang.srt.server_args`` is imported); idempotent."""
    _install(SERVER_ARGS_HOOKS, check_server_args)


def install_engine() -> None:
    """The engine hooks (when ``sglang.srt.entrypoints.engine`` is imported); idempotent."""
    _install(ENGINE_HOOKS, check_engine)


def is_installed() -> bool:
    from .patches import hooks_installed

    return hooks_installed(SERVER_ARGS_HOOKS + ENGINE_HOOKS)
