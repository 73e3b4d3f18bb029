"""The resilience flags, the same on every engine's command line:
``--enable-resilience``, ``--resilience-config FILE.yaml``, ``--resilience-set key.sub=value``
(repeatable). :func:`add_resilience_args` adds them to a parser; :func:`fold_flags` turns the
parsed flags into the adapter's settings dict (:mod:`.settings`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["FLAGS", "add_resilience_args", "fold_flags", "flags_given"]

FLAGS = ("--enable-resilience", "--resilience-config", "--resilience-set")


def add_resilience_args(parser: Any) -> Any:
    """Add the Resilience group to ``parser`` (once per parser)."""
    if "--enable-resilience" in getattr(parser, "_option_string_actions", {}):
        return parser
    group = parser.add_argument_group(
        title="Resilience",
        description="resilient-ep: keep serving when an expert-parallel rank fails.",
    )
    group.add_argument("--enable-resilience", action="store_true", default=False,
                       help="Turn on the resilience layer with its defaults.")
    group.add_argument("--resilience-config", metavar="FILE.yaml", default=None,
                       help="Resilience settings (YAML); implies --enable-resilience.")
    group.add_argument("--resilience-set", metavar="KEY=VALUE", action="append", default=None,
                       help="Override one setting, e.g. detector.heartbeat_interval_ms=20 "
                            "(repeatable); implies --enable-resilience.")
    return parser


def flags_given(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "enable_resilience", False)
                or getattr(args, "resilience_config", None)
                or getattr(args, "resilience_set", None))


def fold_flags(args: argparse.Namespace, section: dict[str, Any] | None) -> dict[str, Any] | None:
    """``section`` (the settings dict so far, or None) with the flags of ``args`` folded in;
    unchanged (None stays None) when no flag was given. Flags win; folding twice is a no-op."""
    if not flags_given(args):
        return section
    out = dict(section) if isinstance(section, dict) else {}
    out["enabled"] = True
    path = getattr(args, "resilience_config", None)
    if path:
        out["config_file"] = str(path)
    overrides = list(getattr(args, "resilience_set", None) or [])
    if overrides:
        have = list(out.get("overrides") or [])
        out["overrides"] = have + [o for o in overrides if o not in have]
    return out
