"""What every command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
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
            message = str(exc) if isinstance(exc, IsdError) else f"{exc.strerror or exc}: {exc.filename}"
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
