"""The resilience flags on vLLM's ``EngineArgs``, and where they take effect.

vLLM offers no hook for plugin flags, so three ``EngineArgs`` methods are wrapped (each
wrapper checks the upstream signature, is marked, and installs once):

- ``EngineArgs.add_cli_args``: adds the ``Resilience`` group (``--enable-resilience``,
  ``--resilience-config FILE.yaml``, ``--resilience-set key.sub=value``). vLLM loads general
  plugins before it builds any parser (``AsyncEngineArgs.add_cli_args``), so ``vllm serve``
  shows them.
- ``EngineArgs.from_cli_args``: carries the flags into ``additional_config["resilience"]``
  (flags win over ``--additional-config``), and adds the ``/resilience/status`` middleware to
  the API server's ``--middleware`` list.
- ``EngineArgs.create_engine_config``: the one place every entry (``vllm serve``, ``LLM()``,
  ``AsyncLLM``) passes before engine processes start. When resilience is on it validates and
  resolves the config (a bad value fails here, naming the dotted field), installs the worker
  extension, turns on KV checkpoints where failover applies (``kv_setup.py``), and activates
  the plugin for this process and the ones it starts (see ``plugin.activate``). When off it changes nothing.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from typing import Any

from ..common.flags import FLAGS, add_resilience_args, fold_flags
from .config import KEY, is_enabled, new_instance_id, normalize

__all__ = ["install", "is_installed", "STATUS_MIDDLEWARE", "WORKER_EXTENSION"]

log = logging.getLogger("vllm." + __name__)

NAME = "vllm-engine-args-hooks"
STATUS_MIDDLEWARE = "resilient_ep.engines.vllm.status.ResilienceStatusMiddleware"
WORKER_EXTENSION = "resilient_ep.engines.vllm.worker.ResilienceWorkerExtension"
_FLAGS = FLAGS


def merge_flags(args: argparse.Namespace, additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """``additional_config`` with the resilience flags of ``args`` folded in."""
    out = dict(additional_config or {})
    raw = out.get(KEY)
    section = fold_flags(args, raw if isinstance(raw, dict) else None)
    if section is not None:
        out[KEY] = section
    return out


def _enable_kv_checkpoints(engine_args: Any) -> None:
    """Failover instances checkpoint KV through our connector (``kv_setup.py``)."""
    if os.environ.get("RESILIENT_EP_VLLM_FAILOVER", "1") == "0":
        return  # the benchmark's "off" arm
    if int(engine_args.data_parallel_size or 1) < 2 or not engine_args.enable_expert_parallel:
        return
    from .config import resilience_config, resilience_settings
    from .kv_setup import kv_transfer_settings

    cfg = resilience_config(engine_args.additional_config)
    instance = str(resilience_settings(engine_args.additional_config)["instance"])
    engine_args.kv_transfer_config = kv_transfer_settings(cfg, instance,
                                                          engine_args.kv_transfer_config)


def _failover_applies(engine_args: Any) -> bool:
    return (os.environ.get("RESILIENT_EP_VLLM_FAILOVER", "1") != "0"
            and int(engine_args.data_parallel_size or 1) > 1
            and bool(engine_args.enable_expert_parallel))


def _translate_redundant_experts(engine_args: Any) -> None:
    """``--eplb-config '{"num_redundant_experts": N}'`` without ``--enable-eplb`` (which
    vLLM refuses off CUDA/ROCm/XPU, and whose replicas follow load, not survival) becomes
    ``placement.redundant_slots_per_rank = ceil(N / EP size)``: the core places them."""
    from resilient_ep.config import ConfigError
    from resilient_ep.placement.budget import redundancy_from_total

    eplb = getattr(engine_args, "eplb_config", None)
    if isinstance(eplb, dict):
        n = int(eplb.get("num_redundant_experts", 0) or 0)
    else:
        n = int(getattr(eplb, "num_redundant_experts", 0) or 0)
    if not n or getattr(engine_args, "enable_eplb", False) or not _failover_applies(engine_args):
        return
    section = engine_args.additional_config[KEY]
    placement = section.setdefault("placement", {})
    if placement.get("redundant_slots_per_rank") is not None:
        raise ConfigError("placement.redundant_slots_per_rank",
                          placement["redundant_slots_per_rank"],
                          f"is set, and so is --eplb-config num_redundant_experts={n}: "
                          f"give the budget once")
    ep = int(engine_args.data_parallel_size) * int(engine_args.tensor_parallel_size or 1)
    placement["redundant_slots_per_rank"] = redundancy_from_total(n, ep)
    if isinstance(eplb, dict):
        eplb["num_redundant_experts"] = 0
    else:
        eplb.num_redundant_experts = 0
    log.info("resilient-ep: --eplb-config num_redundant_experts=%d is placed by the core: "
             "%d redundant slot(s) per rank", n, placement["redundant_slots_per_rank"])


def _decide_shadow_slots(vllm_config: Any) -> None:
    """With ``shadow.enabled``: how many shadow slots each rank gets, decided once here (the
    engine processes must agree on the placement) from this machine's residual memory."""
    from .config import resilience_config
    from .experts import shadow_slots

    section = (vllm_config.additional_config or {}).get(KEY)
    if not isinstance(section, dict):
        return
    cfg = resilience_config(vllm_config.additional_config)
    if cfg is None or not cfg.shadow.enabled or "shadow_slots" in section:
        return
    pc = vllm_config.parallel_config
    if int(pc.data_parallel_size) < 2 or not pc.enable_expert_parallel:
        return
    hf = vllm_config.model_config.hf_config
    text = getattr(hf, "text_config", None) or hf
    experts = int(getattr(text, "num_experts", 0) or getattr(text, "n_routed_experts", 0) or 0)
    if not experts:
        return
    ep = int(pc.data_parallel_size) * int(pc.tensor_parallel_size)
    local = int(getattr(pc, "data_parallel_size_local", None) or pc.data_parallel_size)
    dtype_bytes = vllm_config.model_config.dtype.itemsize
    section["shadow_slots"] = shadow_slots(cfg, hf, dtype_bytes, experts, ep, local)
    log.info("resilient-ep: %d shadow expert slot(s) per rank", section["shadow_slots"])


def _engine_args_cls():
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs


def check() -> None:
    from .patches import PatchError, check_version, expect_signature

    check_version(NAME)
    cls = _engine_args_cls()
    expect_signature(NAME, cls.add_cli_args, ("parser",))
    expect_signature(NAME, cls.__dict__["from_cli_args"].__func__, ("cls", "args"))
    expect_signature(NAME, cls.create_engine_config, ("self", "usage_context", "headless"))
    for field in ("additional_config", "worker_extension_cls"):
        if field not in cls.__dataclass_fields__:
            raise PatchError(f"{NAME}: EngineArgs has no field {field}")


def is_installed() -> bool:
    from .patches import is_marked

    cls = _engine_args_cls()
    return is_marked(cls.__dict__["create_engine_config"], NAME)


def install() -> None:
    """Wrap the three ``EngineArgs`` methods (idempotent)."""
    from .patches import is_marked, mark

    cls = _engine_args_cls()
    if is_marked(cls.__dict__["create_engine_config"], NAME):
        return
    check()

    orig_add = cls.__dict__["add_cli_args"].__func__  # staticmethod

    @functools.wraps(orig_add)
    def add_cli_args(parser):
        return add_resilience_args(orig_add(parser))

    orig_from = cls.__dict__["from_cli_args"].__func__  # classmethod

    @functools.wraps(orig_from)
    def from_cli_args(klass, args):
        engine_args = orig_from(klass, args)
        engine_args.additional_config = merge_flags(args, engine_args.additional_config)
        if is_enabled(engine_args.additional_config):
            middleware = getattr(args, "middleware", None)
            if isinstance(middleware, list) and STATUS_MIDDLEWARE not in middleware:
                middleware.append(STATUS_MIDDLEWARE)
            # With several API servers, vLLM's launcher hands ``args`` to each of them and
            # each builds its engine config again: they must all see resilience on, with the
            # launcher's instance id (it names the instance's sockets).
            section = engine_args.additional_config[KEY]
            if not section.get("instance"):
                from .config import resilience_config
                from .multinode import instance_id

                # across nodes every `vllm serve` derives the same id; else a fresh one
                section["instance"] = (instance_id(resilience_config(
                    engine_args.additional_config), engine_args) or new_instance_id())
            if hasattr(args, "additional_config"):
                args.additional_config = engine_args.additional_config
        return engine_args

    orig_create = cls.__dict__["create_engine_config"]

    @functools.wraps(orig_create)
    def create_engine_config(self, usage_context=None, headless=False):
        from . import plugin

        if is_enabled(self.additional_config):
            self.additional_config = dict(self.additional_config)
            normalize(self.additional_config)
            if int(self.data_parallel_size or 1) > 1:
                from .config import resilience_config
                from .multinode import check_topology

                check_topology(self, resilience_config(self.additional_config),
                               headless=headless)
            if not self.worker_extension_cls:
                self.worker_extension_cls = WORKER_EXTENSION
            elif self.worker_extension_cls != WORKER_EXTENSION:
                raise ValueError(
                    f"--enable-resilience installs worker_extension_cls={WORKER_EXTENSION}; "
                    f"{self.worker_extension_cls} is set already (subclass ours to combine them)"
                )
            _enable_kv_checkpoints(self)
            _translate_redundant_experts(self)
            plugin.activate()
            vllm_config = orig_create(self, usage_context, headless)
            _decide_shadow_slots(vllm_config)
            return vllm_config
        plugin.deactivate_children()
        return orig_create(self, usage_context, headless)

    cls.add_cli_args = staticmethod(mark(add_cli_args, NAME, orig_add))
    cls.from_cli_args = classmethod(mark(from_cli_args, NAME, orig_from))
    cls.create_engine_config = mark(create_engine_config, NAME, orig_create)
