"""Every number of a recipe has its range in the typed recipe: a value outside it, NaN or infinity is one
line naming the key, from YAML, from ``--set`` and from a :class:`Recipe` built in Python, before any
work starts (no run folder is written)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Annotated, get_args, get_origin, get_type_hints

import pytest
from click.testing import CliRunner

from isdretrieve.cli.train import main
from isdretrieve.errors import RecipeError
from isdretrieve.train.recipe import METHOD_CONFIGS, EngineConfig, OptimConfig, Recipe, recipe_from_data
from isdretrieve.util.typed_config import Range, range_of

DEMO = str(Path(__file__).resolve().parents[1] / "training" / "digits-isd.yaml")
SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "method"}


def _numbers(cls: type, path: str) -> typing.Iterator[tuple[str, object, type]]:
    """(dotted key, hint, int or float) of every numeric field under dataclass ``cls``, tuples' items too."""
    hints = get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        yield from _leaves(hints[f.name], f"{path}.{f.name}")


def _leaves(hint: object, key: str) -> typing.Iterator[tuple[str, object, type]]:
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    if get_origin(base) in (typing.Union, types.UnionType):
        for option in get_args(base):
            if option is not type(None):
                yield from _leaves(option, key)
    elif get_origin(base) is tuple:
        for i, item in enumerate(a for a in get_args(base) if a is not Ellipsis):
            yield from _leaves(item, f"{key}[{i}]")
    elif dataclasses.is_dataclass(base):
        yield from _numbers(base, key)
    elif base in (int, float):
        yield key, hint, base


def _all_numbers() -> list[tuple[str, object, type]]:
    found = []
    for name, cls in METHOD_CONFIGS.items():
        found += [(f"{name}:{key}", hint, kind) for key, hint, kind in _numbers(cls, "method")]
    for section in SECTIONS:
        hints = get_type_hints(Recipe, include_extras=True)
        found += list(_numbers(hints[section], section))
    return found


NUMBERS = _all_numbers()


def test_every_numeric_field_has_a_range():
    assert len(NUMBERS) > 60
    missing = [key for key, hint, _ in NUMBERS if range_of(hint) is None]
    assert not missing, f"numeric recipe fields without a Range: {missing}"


def _outside(rule: Range, kind: type) -> list[float]:
    """Values just outside ``rule`` on each bounded side, as ``kind``."""
    out = []
    step = 1 if kind is int else 0.5
    if rule.ge is not None:
        out.append(rule.ge - step)
    if rule.gt is not None:
        out.append(rule.gt if kind is float else rule.gt)
    if rule.le is not None:
        out.append(rule.le + step)
    if rule.lt is not None:
        out.append(rule.lt)
    return [int(v) if kind is int else float(v) for v in out]


def _plant(key: str, value: object) -> dict:
    """Recipe data holding ``value`` at ``key`` (``method:isd:method.queue_size`` names the method)."""
    method, _, key = key.rpartition(":")
    data: dict = {"method": {"name": method.partition(":")[0]}} if method else {}
    parts = key.replace("[", ".[").split(".")
    node = data
    for part in parts[:-1]:
        if part.startswith("["):
            continue
        node = node.setdefault(part, {})
    last = parts[-1]
    if last.startswith("["):  # a tuple's item: plant a whole tuple with one bad item
        name = parts[-2]
        position = int(last[1:-1])
        parent = data
        for part in parts[:-2]:
            parent = parent[part]
        good = {"crop_scale": [0.2, 1.0], "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4]}
        items = list(good.get(name, [0.9, 0.999] if name == "betas" else [10]))
        items[position] = value
        parent[name] = items
    else:
        node[last] = value
    return data


CASES = [
    pytest.param(key, value, id=f"{key}={value}")
    for key, hint, kind in NUMBERS
    for value in [*_outside(range_of(hint), kind), *([math.nan, math.inf] if kind is float else [])]
]


@pytest.mark.parametrize(("key", "value"), CASES)
def test_a_value_outside_its_range_is_one_line_naming_the_key(key, value):
    dotted = key.rpartition(":")[2]
    with pytest.raises(RecipeError) as info:
        recipe_from_data(_plant(key, value))
    message = str(info.value)
    assert message.startswith(f"{dotted}: must "), message
    if not math.isfinite(value):
        assert message.startswith(f"{dotted}: must be a finite number, got {value}"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Recipe(optim=OptimConfig(momentum=-1.0)), "optim.momentum: must be in [0, 1), got -1.0"),
        (lambda: Recipe(optim=OptimConfig(warmup_epochs=math.nan)), "optim.warmup_epochs: must be a finite"),
        (lambda: Recipe(engine=EngineConfig(checkpoint_every=0)), "engine.checkpoint_every: must be positi"),
        (lambda: Recipe(optim=OptimConfig(betas=(0.9, 1.0))), "optim.betas[1]: must be in [0, 1), got 1.0"),
        (lambda: Recipe(method=METHOD_CONFIGS["moco"](queue_size=0)), "method.queue_size: must be positive"),
    ],
)
def test_a_recipe_built_in_python_is_checked_too(build, message):
    with pytest.raises(RecipeError) as info:
        build()
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine.log_every=0", "error: engine.log_every: must be positive, got 0"),
        ("engine.checkpoint_every=0", "error: engine.checkpoint_every: must be positive, got 0"),
        ("method.queue_size=0", "error: method.queue_size: must be positive, got 0"),
        ("method.queue_size=-5", "error: method.queue_size: must be positive, got -5"),
        ("optim.warmup_epochs=.nan", "error: optim.warmup_epochs: must be a finite number, got nan"),
        ("optim.momentum=-1", "error: optim.momentum: must be in [0, 1), got -1.0"),
        ("optim.lr=.inf", "error: optim.lr: must be a finite number, got inf"),
        ("augment.crop_scale=[0.9,0.2]", "error: augment.crop_scale: the low end must not exceed"),
    ],
)
def test_isd_train_refuses_before_any_work(tmp_path, override, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [DEMO, "--out", str(out), "--set", override, "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert not out.exists() or not any(out.iterdir())
