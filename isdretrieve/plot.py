"""Small line charts drawn with Pillow (no plotting library needed for a few audit curves)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from isdretrieve.atomic import atomic_path

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
PANEL_W, PANEL_H, MARGIN = 480, 320, 48


@dataclass
class Panel:
    """One chart: named series of (x, y) points over a shared y range [0, 1] by default."""

    title: str
    x_label: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    y_range: tuple[float, float] = (0.0, 1.0)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, left: int, font: ImageFont.ImageFont) -> None:
    x0, y0, x1, y1 = left + MARGIN, MARGIN, left + PANEL_W - 16, PANEL_H - MARGIN
    xs = [x for xs_, _ in panel.series.values() for x in xs_]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1.0
    y_lo, y_hi = panel.y_range

    def at(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_lo) / (x_hi - x_lo)
        fy = (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    draw.text((x0, 12), panel.title, fill=(0, 0, 0), font=font)
    draw.text(((x0 + x1) // 2 - 30, y1 + 24), panel.x_label, fill=(0, 0, 0), font=font)
    for y in _ticks(y_lo, y_hi):
        _, py = at(x_lo, y)
        draw.line((x0 - 4, py, x0, py), fill=(0, 0, 0))
        draw.text((left + 8, py - 6), f"{y:.2f}", fill=(0, 0, 0), font=font)
    for x in _ticks(x_lo, x_hi):
        px, _ = at(x, y_lo)
        draw.line((px, y1, px, y1 + 4), fill=(0, 0, 0))
        draw.text((px - 12, y1 + 8), f"{x:.3g}", fill=(0, 0, 0), font=font)
    for n, (name, (sx, sy)) in enumerate(panel.series.items()):
        colour = COLOURS[n % len(COLOURS)]
        points = [at(x, y) for x, y in zip(sx, sy, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((x1 - 110, y0 + 8 + 14 * n), name, fill=colour, font=font)


def line_charts(panels: Sequence[Panel], path: str | Path) -> Path:
    """Draw ``panels`` side by side into the PNG ``path`` (written atomically)."""
    image = Image.new("RGB", (PANEL_W * max(1, len(panels)), PANEL_H), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, i * PANEL_W, font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
