"""The k-NN protocols by name (no torch here, so the CLI can offer them without importing it)."""

from __future__ import annotations

from typing import Literal

Weighting = Literal["exp", "uniform"]
WEIGHTINGS: tuple[Weighting, ...] = ("exp", "uniform")
PRESETS: dict[str, tuple[tuple[int, ...], float, Weighting]] = {
    "dino": ((20,), 0.07, "exp"),
    "instdisc": ((200,), 0.1, "exp"),
    "isd": ((1, 20), 0.07, "uniform"),
}
