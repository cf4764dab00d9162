"""Progress lines of long library jobs: to the terminal's stderr when asked for, else nowhere."""

from __future__ import annotations

from collections.abc import Callable


def reporter(progress: bool) -> Callable[[str], None]:
    """``say(message)``: a time-stamped line on stderr when ``progress``, else nothing."""
    if not progress:
        return lambda message: None
    from rich.console import Console

    return Console(stderr=True).log
