"""Settings checked before any work, each failure one line naming the key, the value and what is allowed.

Model keys are checked against the constructor they fill: models are plain modules with typed keyword arguments
that the YAML mirrors, so the annotations say what each key takes (`generator.model.depth=abc` is refused before
anything is built). Training, evaluation and sampling numbers are checked against their ranges.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin


class SettingError(ValueError):
    """A setting with a value it cannot take; the message names the key and what is allowed."""


def _fits(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    return True  # a type this check does not know: the constructor decides


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and get_origin(hint) is None else str(hint).replace("typing.", "")


def keyword_types(cls: type) -> dict[str, Any]:
    """The annotated keyword arguments `cls(...)` takes, those it passes on with `**kwargs` to a base class
    included."""
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        resolved = typing.get_type_hints(init)
        hints = {**{name: resolved.get(name, Any) for name, p in parameters.items()
                    if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}, **hints}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break  # this constructor takes nothing further up
    return hints


def check_model_keys(cls: type, values: Mapping[str, Any], *, where: str,
                     supplied: tuple[str, ...] = ()) -> None:
    """Each `values` key must be a keyword of `cls` and fit its annotation (`supplied`: filled at run time)."""
    hints = keyword_types(cls)
    for name, value in values.items():
        if name.startswith("_"):
            continue
        if name not in hints:
            known = ", ".join(k for k in hints if k not in supplied)
            raise SettingError(f"{where}.{name} is not a setting of {cls.__name__}; it takes: {known}")
        if not _fits(value, hints[name]):
            raise SettingError(f"{where}.{name}={value!r}: {cls.__name__} takes {name}: {_describe(hints[name])}")


def check_range(where: str, value: Any, *, minimum: float | None = None, above: float | None = None,
                below: float | None = None, integer: bool = False, optional: bool = False) -> None:
    """`value` must be a number (an integer if `integer`) ≥ minimum, > above and < below; None if `optional`."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    numeric = isinstance(value, int) if integer else isinstance(value, (int, float))
    bounds = [(minimum, "≥", lambda v, b: v >= b), (above, ">", lambda v, b: v > b), (below, "<", lambda v, b: v < b)]
    ok = numeric and not isinstance(value, bool) and all(test(value, b) for b, _, test in bounds if b is not None)
    if not ok:
        limits = " and ".join(f"{sign} {b}" for b, sign, _ in bounds if b is not None)
        raise SettingError(f"{where}={value!r}: must be {kind} {limits}" + (" (or null)" if optional else ""))
