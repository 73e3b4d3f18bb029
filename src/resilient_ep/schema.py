"""Nested frozen dataclasses from plain dicts (YAML, JSON, engine flags), and back.

Shared by the resilience configuration (``config.py``) and the simulator's scenarios
(``sim/scenario.py``). Field types drive the checks: ``bool``, ``int``, ``float`` (finite),
``str``, ``Literal[...]``, ``tuple[T, ...]``, unions and nested dataclasses. Every error is a
:class:`FieldError` (or the subclass the caller names) carrying the dotted field, the value
and the reason: ``detector.heartbeat_timeout_ms: must be a number, got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

__all__ = ["FieldError", "build", "to_plain"]


class FieldError(ValueError):
    """A field is unknown, missing, of the wrong type or impossible.

    ``field`` is the dotted path (``failures[2].rank``), ``value`` what was given."""

    def __init__(self, field: str, value: Any, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason}, got {value!r}")


def build(cls: type, data: Any, *, prefix: str = "", root: str = "config",
          error: type[FieldError] = FieldError) -> Any:
    """``cls(**data)`` with every key checked against ``cls``'s fields, recursively.

    Fields without a default are required. ``cls.__post_init__`` may raise ``error`` with a
    field name relative to ``cls``; it is re-raised with the full dotted path."""
    if not isinstance(data, dict):
        raise error(prefix or root, data, "must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = key if isinstance(key, str) and key.strip() else repr(key)
        dotted = f"{prefix}.{name}" if prefix else name
        if key not in fields:
            raise error(dotted, value, f"unknown key (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(hints[key], value, dotted, root, error)
    for name, f in fields.items():
        if (name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise error(f"{prefix}.{name}" if prefix else name, None, "is required")
    try:
        return cls(**kwargs)
    except FieldError as e:
        if prefix and not e.field.startswith(prefix):
            raise error(f"{prefix}.{e.field}", e.value, e.reason) from None
        raise


def to_plain(obj: Any) -> Any:
    """Plain nested dicts and lists (tuples become lists): the inverse of :func:`build`."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(x) for x in obj]
    return obj


def _coerce(tp: Any, value: Any, dotted: str, root: str, error: type[FieldError]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=dotted, root=root, error=error)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise error(dotted, value, f"must be one of {list(allowed)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(dotted, value, "must be a list")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, f"{dotted}[{i}]", root, error) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        reasons = []
        for alt in typing.get_args(tp):
            if alt is type(None):
                if value is None:
                    return None
                reasons.append("null")
                continue
            try:
                return _coerce(alt, value, dotted, root, error)
            except FieldError as e:
                reasons.append(e.reason)
        raise error(dotted, value, " or ".join(reasons))
    if tp is bool:
        if not isinstance(value, bool):
            raise error(dotted, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(dotted, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(dotted, value, "must be a number")
        if not math.isfinite(value):
            raise error(dotted, value, "must be finite")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(dotted, value, "must be a string")
        return value
    return value
