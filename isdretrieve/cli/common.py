"""What every command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from isdretrieve.errors import IsdError

verbose_option = click.option("--verbose", is_flag=True, help="Show the full traceback on errors.")


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
