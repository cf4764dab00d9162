"""The HTML report of near-duplicate groups: the largest groups, one line each, with thumbnails.

``REPORT_DIR/index.html`` shows each group's kept row first (framed blue), then the rows it would drop
with their cosine similarity to it and their class; pictures come from the bank's data SPEC, as in the
neighbours report (:mod:`isdretrieve.retrieve.report`: same thumbnails, style and escaping; no script).
File names come from row numbers only; ``index.html`` is written last.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from isdretrieve.errors import IsdError
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.bank import FeatureBank
from isdretrieve.retrieve.hits import class_name
from isdretrieve.retrieve.pictures import THUMB, ImageSource, fit
from isdretrieve.retrieve.report import REPORT_STYLE, inside_folder, write_thumb

SHOWN_PER_GROUP = 24  # members drawn per group; the rest are counted


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def write_dedup_report(
    bank_path: str | Path,
    groups: Sequence[np.ndarray],
    similarity: np.ndarray,
    out_dir: str | Path,
    *,
    title: str = "",
    summary: str = "",
) -> Path:
    """Write ``out_dir/index.html`` for ``groups`` (bank rows of each group, kept row first) with each
    row's ``similarity`` [N] to its kept row; returns the path of ``index.html``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IsdError(f"report folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    (root / "index.html").unlink(missing_ok=True)
    with FeatureBank.open(bank_path) as bank:
        indices, labels, paths, classes = bank.indices(), bank.labels(), bank.paths(), bank.classes
        source = ImageSource(bank.data_spec)
    lines = []
    for number, rows in enumerate(groups):
        cells = []
        for position, row in enumerate(rows[:SHOWN_PER_GROUP]):
            row = int(row)
            picture = source.row(int(indices[row]), paths[row])
            thumb = write_thumb(root, f"thumbs/r{row}.png", None if picture is None else fit(picture, THUMB))
            kept = position == 0
            caption = [
                "kept" if kept else f"{similarity[row]:.4f}",
                class_name(int(labels[row]), classes),
                f"row {row}",
            ]
            text = "<br>".join(_e(line) for line in caption)
            image = f'<img src="{_e(thumb)}" alt="{_e(paths[row])}" title="{_e(paths[row])}">'
            cells.append(f'<td class="{"query" if kept else "hit"}">{image}{text}</td>')
        more = len(rows) - SHOWN_PER_GROUP
        if more > 0:
            cells.append(f"<td>and {more:,} more</td>")
        lines.append(f"<tr><th>group {number}<br>{len(rows):,} rows</th>{''.join(cells)}</tr>")
    policy = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
        f"<title>Near-duplicates: {_e(title)}</title>\n<style>{REPORT_STYLE}</style></head>\n<body>\n"
        f"<h1>Near-duplicates: {_e(title)}</h1>\n<p>{_e(summary)}</p>\n"
        "<table>\n" + "\n".join(lines) + "\n</table>\n</body></html>\n"
    )
    with atomic_path(inside_folder(root, "index.html")) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return root / "index.html"
