"""Declaring a setting: one dataclass field carries everything gptrain knows about it.

    lr: float = setting(2e-3, "peak learning rate", flags=("--lr", "--learning-rate"), gt=0)

From that one declaration come the command-line flag (and its aliases, choices and `--help`
text), TOML loading with its type and name checks, the value checks applied to every source
(command line, TOML file, a resumed checkpoint's config), config.json, and the README's flag
table (`python -m gptrain.config --readme`). A new setting is one such field; nothing else
needs to be written anywhere.

This module depends on nothing else in gptrain, so that every module that owns a settings
section (the model, the optimizer, data preparation) can declare its own fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gptrain.errors import UserError

_NO_DEFAULT = dataclasses.MISSING


@dataclass(frozen=True)
class Setting:
    """What the command line, TOML loading, the checks and the README need to know of one field."""

    help: str
    flags: tuple[str, ...] = ()  # () → --field-name; the first is the one messages name
    negate: str | None = None  # for a bool: a flag that sets it to False (listed in --help)
    choices: tuple[str, ...] | None = None
    ge: float | None = None  # bounds (inclusive / exclusive); None values of optional settings are not checked
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    hint: str = ""  # appended to a bounds error, e.g. "(0: no clipping)"
    default_text: str | None = None  # how --help and the README show the default ("the dataset's")
    cli: bool = True  # False: TOML and config.json only (settings that no flag should set)
    metavar: str | None = None


def setting(default: Any = _NO_DEFAULT, help: str = "", *, default_factory: Callable[[], Any] | None = None,
            **kwargs: Any) -> Any:
    """A dataclass field with its declaration attached (see the module docstring)."""
    meta = {"setting": Setting(help=help, **kwargs)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declaration(f: dataclasses.Field) -> Setting:
    found = f.metadata.get("setting")
    if found is None:
        raise TypeError(f"field {f.name} has no setting() declaration")
    return found


def declared_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "setting" in f.metadata]


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    return declaration(f).flags or ("--" + f.name.replace("_", "-"),)


def value_type(cls: type, name: str) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    t = typing.get_type_hints(cls)[name]
    args = typing.get_args(t)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return t, False


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


# ---------------------------------------------------------------------------------------- values
def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Convert a TOML/JSON/command-line value to the field's type, or raise UserError naming `where`."""
    t, optional = value_type(cls, name)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if t in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # int(True) would be 1: `n_layers = true` is a typo, not a 1-layer model
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str) and "e" in value.lower():
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError(value)
                return int(as_float)
            return int(value)
        if t is float:
            return float(value)
        if t is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if typing.get_origin(t) is list:
            return [str(v) for v in (value if isinstance(value, list) else [value])]
    except (TypeError, ValueError, OverflowError):
        shown = json.dumps(value) if isinstance(value, bool) else repr(value)  # TOML's spelling: true, not True
        raise UserError(f"{where} expects {getattr(t, '__name__', t)}, got {shown}.") from None
    return value


def check_value(cls: type, f: dataclasses.Field, value: Any, where: str) -> None:
    """The declared checks of one value, wherever it came from: choices, bounds, finite numbers."""
    s = declaration(f)
    if value is None:
        return
    items = value if isinstance(value, list) else [value]
    if s.choices is not None:
        for item in items:
            if item not in s.choices:
                raise UserError(f"{where}: '{item}' is not one of {', '.join(s.choices)}.{suggest(str(item), s.choices)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value}.")
    phrase = bounds_phrase(s)
    inside = ((s.ge is None or value >= s.ge) and (s.gt is None or value > s.gt)
              and (s.le is None or value <= s.le) and (s.lt is None or value < s.lt))
    if not inside:
        hint = f" {s.hint}" if s.hint else ""
        raise UserError(f"{where} must be {phrase}{hint}, got {value:g}.")


def bounds_phrase(s: Setting) -> str:
    """'at least 1', 'positive', '≥ 0', 'in [0, 1)', ... for the bounds a setting declares."""
    low = f"[{s.ge:g}" if s.ge is not None else f"({s.gt:g}" if s.gt is not None else None
    high = f"{s.le:g}]" if s.le is not None else f"{s.lt:g})" if s.lt is not None else None
    if low and high:
        return f"in {low}, {high}"
    if s.gt == 0:
        return "positive"
    if s.ge == 1:
        return "at least 1"
    if s.ge is not None:
        return f"≥ {s.ge:g}"
    if s.gt is not None:
        return f"> {s.gt:g}"
    if s.le is not None:
        return f"≤ {s.le:g}"
    return f"< {s.lt:g}" if s.lt is not None else "valid"


def check_all(obj: Any, where: Callable[[dataclasses.Field], str]) -> None:
    """Check every declared field of a settings dataclass instance."""
    for f in declared_fields(type(obj)):
        check_value(type(obj), f, getattr(obj, f.name), where(f))


# ---------------------------------------------------------------------------------------- docs
def describe_default(f: dataclasses.Field) -> str:
    s = declaration(f)
    if s.default_text is not None:
        return s.default_text
    value = default_of(f)
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def markdown_rows(cls: type, section: str) -> list[str]:
    """README rows: | flags | meaning | default |, one per declared command-line setting."""
    rows = []
    for f in declared_fields(cls):
        s = declaration(f)
        if not s.cli:
            continue
        flags = list(flags_of(f)) + ([s.negate] if s.negate else [])
        meaning = s.help.replace("|", "\\|")
        if s.choices:
            meaning += f" ({', '.join(s.choices)})"
        default = describe_default(f).replace("|", "\\|")
        if default and s.default_text is None:
            default = f"`{default}`"  # a literal value; default_text is prose
        rows.append(f"| {' '.join(f'`{x}`' for x in flags)} | {meaning} | {default} |")
    return rows
