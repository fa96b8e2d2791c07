"""Type checks for the optional config sections (``extensions.gptq``, ``extensions.clip_search``, ``extensions.continuous``,
``correction``, ``mixed``).

Why this exists: jsonargparse checks the type of every key of a plain section while parsing, but a section
declared ``X | None`` is parsed as a union, and the values inside it reach the dataclass as given:
``--extensions.gptq.damp null`` arrived as ``None`` and the range check failed with a ``TypeError`` deep in the
parser (a traceback, found by the config fuzz test). Each optional section calls :func:`check_field_types`
first in its ``__post_init__``, so a wrong type is the same one-line error as a wrong value.

:func:`changed_fields` lists the keys of a section set away from their defaults, for the rules that refuse a
setting the run would ignore.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any, Literal

from cbq_lightning.errors import ConfigError


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (``float`` accepts an int, no number accepts a bool)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        (member, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(item, member) for item in value)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(hint))
    if origin in (list, tuple):
        (member, *_) = typing.get_args(hint) or (Any,)
        return f"a list of {_describe(member)}"
    names = {type(None): "null", bool: "true or false", int: "a whole number", float: "a finite number",
             str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def changed_fields(section: Any, names: Sequence[str] | None = None) -> list[tuple[str, Any, Any]]:
    """``(name, value, default)`` of each field of the dataclass ``section`` (or of those in ``names``) whose value
    differs from its default: what a setting that the run would ignore must be refused for."""
    changed = []
    for field in fields(section):
        if names is not None and field.name not in names:
            continue
        if field.default is not MISSING:
            default = field.default
        elif field.default_factory is not MISSING:
            default = field.default_factory()
        else:  # a required key has no default to differ from: it counts as set
            default = MISSING
        if getattr(section, field.name) != default:
            changed.append((field.name, getattr(section, field.name), default))
    return changed


def check_field_types(section: Any, key: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``key.field`` for the first field of the dataclass
    ``section`` whose value does not match its annotation."""
    hints = typing.get_type_hints(type(section))
    for field in fields(section):
        value, hint = getattr(section, field.name), hints[field.name]
        if not _matches(value, hint):
            raise ConfigError(f"{key}.{field.name}={value!r} must be {_describe(hint)}.")
