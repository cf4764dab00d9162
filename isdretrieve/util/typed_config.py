"""Typed configuration: build a dataclass tree from plain YAML data, naming every bad key.

Unknown keys, wrong types, bad literal values and numbers out of their range raise ``RecipeError`` with
the dotted key path, e.g. ``optim.lr: expected a number, got 'fast'``. Tuples and lists, ``X | None``,
``Literal[...]``, nested dataclasses and ``Annotated[int | float, Range(...)]`` are supported; that is all
recipes need. Every float must be finite (NaN and infinity are refused) whether or not it has a range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from isdretrieve.errors import RecipeError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``ge``/``gt`` below, ``le``/``lt`` above (None: unbounded).

    Declared as ``Annotated[int, Range(ge=1)]``; :meth:`check` gives the one-line error naming the key."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """The rule in words: "must be positive", "must be in [0, 1)", "must be at least 2"."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return f"must be in {left}{_plain(low)}, {_plain(high)}{right}"
        if high is not None:
            return f"must be {'at most' if self.le is not None else 'below'} {_plain(high)}"
        if self.gt == 0 or self.ge == 1:
            return "must be positive"
        if self.ge == 0:
            return "must not be negative"
        if low is not None:
            return f"must be {'at least' if self.ge is not None else 'above'} {_plain(low)}"
        return "must be a finite number"

    def check(self, value: float, key: str) -> None:
        """RecipeError ``KEY: must be ..., got VALUE`` unless ``value`` is finite and in the range."""
        if not self.contains(value):
            rule = self.describe() if math.isfinite(value) else FINITE.describe()
            raise RecipeError(f"{key}: {rule}, got {value!r}")


FINITE = Range()


def _plain(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def range_of(hint: Any) -> Range | None:
    """The Range in an ``Annotated[...]`` hint (None when it has none)."""
    if get_origin(hint) is Annotated:
        return next((a for a in hint.__metadata__ if isinstance(a, Range)), None)
    return None


def check_ranges(obj: Any, path: str = "") -> None:
    """Check every ranged number (and that every float is finite) of a dataclass tree built in Python,
    naming the first bad key by its dotted path; what :func:`from_dict` checks as it converts."""
    hints = get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        _check_value(hints[f.name], getattr(obj, f.name), _join(path, f.name))


def _check_value(hint: Any, value: Any, path: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_ranges(value, path)
    elif isinstance(value, (tuple, list)):
        args = [a for a in get_args(_strip(hint)) if a is not Ellipsis]
        for i, item in enumerate(value):
            _check_value(args[min(i, len(args) - 1)] if args else Any, item, _join(path, i))
    elif isinstance(value, (int, float)):
        found = range_of(hint) or _union_range(hint)
        if found is not None or isinstance(value, float):
            (found or FINITE).check(value, path)


def _strip(hint: Any) -> Any:
    """``X`` from ``X | None`` and from ``Annotated[X, ...]``."""
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    if get_origin(hint) in (typing.Union, types.UnionType):
        options = [o for o in get_args(hint) if o is not type(None)]
        if len(options) == 1:
            return _strip(options[0])
    return hint


def _union_range(hint: Any) -> Range | None:
    """The Range of the numeric member of ``Annotated[...] | None``."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        return next((r for r in map(range_of, get_args(hint)) if r is not None), None)
    return None


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise RecipeError(f"unknown key '{where}{unknown[0]}' (allowed: {', '.join(sorted(fields))})")
    values = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{path or 'recipe'}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) from a dataclass tree, YAML- and JSON-friendly."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing or malformed file is a ``RecipeError``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to nested plain data in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"bad override '{assignment}': expected key=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"bad override '{assignment}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def _join(path: str, name: str | int) -> str:
    return f"{path}[{name}]" if isinstance(name, int) else (f"{path}.{name}" if path else name)


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value  # already built
    if get_origin(hint) is Annotated:
        converted = _convert(get_args(hint)[0], value, path)
        (range_of(hint) or FINITE).check(converted, path)
        return converted
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, path)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0])
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise RecipeError(f"{path}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"{path}: expected {len(args)} values, got {len(value)}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_convert(a, v, _join(path, i)) for i, (a, v) in pairs)
        item = args[0] if args else Any
        items = [_convert(item, v, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        number = _float(value)
        if number is not None:
            FINITE.check(number, path)
            return number
        raise RecipeError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{path}: expected a string, got {value!r}")
    raise RecipeError(f"{path}: unsupported type {hint}")


def _float(value: Any) -> float | None:
    """A YAML number as a float (YAML 1.1 reads '1e-4', without a dot, as a string); None if none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
