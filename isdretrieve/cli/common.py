"""What every command shares: one-line errors (exit code 2), ``--json`` output, validated option types."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from isdretrieve.errors import IsdError
from isdretrieve.util.sizes import parse_size

CONTEXT = {"help_option_names": ["-h", "--help"]}

verbose_option = click.option("--verbose", is_flag=True, help="Show the full traceback on errors.")
json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result as one JSON document on stdout; nothing else goes to stdout.",
)

POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
UNIT = click.FloatRange(0.0, 1.0)


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether CUDA is present is checked where it is used."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
            self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)
        return text


DEVICE = DeviceType()


class SizeType(click.ParamType):
    """A size in bytes such as ``512MB`` or ``4G``, more than 0 bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except IsdError as exc:
            self.fail(str(exc), param, ctx)
        if size <= 0:
            self.fail(f"must be more than 0 bytes, got {value!r}", param, ctx)
        return size


SIZE = SizeType()


class OneLineErrors:
    """Mixin for a top-level command or group: click's usage errors become one line on stderr.

    Click prints a usage block, a hint and the error on four lines; here it is ``error: MESSAGE (see
    'COMMAND --help')`` with click's exit code (2 for usage errors), like the library's own errors.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            message = " ".join(exc.format_message().split())
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class Command(OneLineErrors, click.Command):
    """A stand-alone command (``isd-train``, ``isd-knn``) with one-line usage errors."""


class Group(OneLineErrors, click.Group):
    """A command group (``isd-index``) with one-line usage errors for all its subcommands."""


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses as dicts, paths as strings, NaN/inf as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        return jsonable(value.item())
    return value


def emit(result: Any, as_json: bool, text: str | Callable[[], object] | None = None) -> None:
    """A command's result: with ``--json`` one JSON document on stdout; otherwise ``text`` (a string to
    echo, or a function that prints the human-readable form)."""
    if as_json:
        click.echo(json.dumps(jsonable(result), indent=2))
    elif callable(text):
        text()
    elif text is not None:
        click.echo(text)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body; an ``IsdError`` (or an OSError about a file) ends in one clear line."""

    @functools.wraps(func)
    def wrapper(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (IsdError, OSError) as exc:
            if verbose:
                traceback.print_exc()
            message = str(exc) if isinstance(exc, IsdError) else _os_message(exc)
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:  # Ctrl-C, or training's ``Interrupted`` (checkpoint saved)
            click.echo(str(exc) or "interrupted", err=True)
            sys.exit(getattr(exc, "exit_code", 130))

    return wrapper


def _os_message(exc: OSError) -> str:
    """``No space left on device: PATH``; without a file name just the reason (never ``: None``)."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, FileExistsError) and exc.filename and os.path.isfile(exc.filename):
        reason = "a file is in the way of a folder"  # mkdir of OUT's parent: 'File exists' confuses
    return f"{reason}: {exc.filename}" if exc.filename is not None else reason
