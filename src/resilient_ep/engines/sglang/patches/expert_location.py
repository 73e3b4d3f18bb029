"""The scheduler's failover side is set up once the model is loaded (failover path; a
``HookRegistry`` AFTER hook, not a ledger entry).

Why: the core's active expert map must be written into SGLang's ``ExpertLocationMetadata``
after the weight loader has filled every physical slot (the loader reads the same tables to
know where each expert goes), and before the first forward pass.

How: an AFTER hook on ``ModelRunner.load_model`` calls ``scheduler.on_model_loaded`` (the
failover group, the active map, the membership listeners, the rank file) where failover
applies; elsewhere it does nothing.
"""

from __future__ import annotations

from . import check_version, expect_signature, hook, hooked, unwrapped

NAME = "sglang-expert-location"
TARGET_MODULE = "sglang.srt.model_executor.model_runner"
_LOAD = f"{TARGET_MODULE}.ModelRunner.load_model"



def check() -> None:
    check_version(NAME)
    from sglang.srt.eplb import expert_location as el
    from sglang.srt.model_executor.model_runner import ModelRunner

    expect_signature(NAME, unwrapped(ModelRunner.load_model), ("self",))
    for field in ("logical_to_all_physical_map", "logical_to_all_physical_map_cpu",
                  "logical_to_all_physical_map_num_valid", "physical_to_logical_map_cpu"):
        if field not in el.ExpertLocationMetadata.__dataclass_fields__:
            from . import PatchError

            raise PatchError(f"{NAME}: ExpertLocationMetadata has no {field}; see docs/sglang.md")


def after_load_model(result, self):
    from ..instance import failover_enabled

    if failover_enabled():
        from ..scheduler import on_model_loaded

        on_model_loaded(self)
    return result


def is_applied() -> bool:
    return hooked(_LOAD, after_load_model)


def apply() -> None:
    hook(NAME, _LOAD, after_load_model, "AFTER")
