"""Draw :class:`~isdretrieve.retrieve.queries.NeighbourResult` s as files: PNG grid pages and an HTML report.

``REPORT_DIR`` receives ``page-001.png`` ... (``per_page`` queries a page: the query tile, then its
neighbours with score and class; wrong-label neighbours framed red, the query framed blue),
``thumbs/*.png``, ``map.png`` when asked for (a 2-D map of the bank coloured by class, the queries'
rows and neighbours ringed: :mod:`isdretrieve.retrieve.map`) and ``index.html`` (every query, a filter
by query class that needs JavaScript, all rows shown without it; ``index.html#cls=LABEL`` opens it
filtered). File names come from counters and row
numbers only, never from user data; every text in the HTML is escaped, and a Content-Security-Policy
lets only the report's own script run. Each file is written atomically and ``index.html`` last, so an
interrupted report has no ``index.html``.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from isdretrieve.errors import IsdError
from isdretrieve.files.atomic import atomic_path
from isdretrieve.retrieve.hits import class_name
from isdretrieve.retrieve.map import map_png
from isdretrieve.retrieve.pictures import THUMB, ImageSource, fit, load_font
from isdretrieve.retrieve.queries import NeighbourQuery, NeighbourResult

if TYPE_CHECKING:
    from isdretrieve.retrieve.queries import QueryItem
    from isdretrieve.retrieve.retriever import Retriever

TILE = 96  # side of an image tile on a PNG page
CAPTION = 30  # caption height under a tile: two lines
PAD = 6
GAP = 16  # between the query tile and its neighbours
QUERY_COLOUR, WRONG_COLOUR, PLAIN_COLOUR = (31, 111, 235), (209, 36, 47), (200, 200, 200)
BACKGROUND = (255, 255, 255)
MISSING = "thumbs/missing.png"

_SCRIPT = """
const select = document.getElementById("cls");
const rows = Array.from(document.querySelectorAll("tr[data-cls]"));
function apply() {
  let shown = 0;
  for (const row of rows) {
    row.hidden = select.value !== "all" && row.dataset.cls !== select.value;
    shown += row.hidden ? 0 : 1;
  }
  document.getElementById("shown").textContent = shown + " of " + rows.length + " queries";
}
const wanted = new URLSearchParams(location.hash.slice(1)).get("cls");  // index.html#cls=3
if (Array.from(select.options).some((option) => option.value === wanted)) select.value = wanted;
select.addEventListener("change", apply);
document.getElementById("filter").hidden = false;
apply();
"""
REPORT_STYLE = """
body { font: 13px sans-serif; margin: 16px; }
table { border-collapse: separate; border-spacing: 6px; }
td { vertical-align: top; width: 104px; font-size: 11px; overflow-wrap: anywhere; }
td img { width: 96px; height: 96px; display: block; border: 3px solid #c8c8c8; }
td.query img { border-color: #1f6feb; }
td.wrong img { border-color: #d1242f; }
td.wrong .cls { color: #d1242f; font-weight: bold; }
th { font-weight: normal; color: #666; vertical-align: top; }
"""


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote; ``missing`` counts images drawn as placeholders."""

    directory: Path
    index_html: Path
    pages: list[Path]
    missing: int = 0
    problem: str = ""  # why the bank's data set could not be opened, if it could not


def _query_name(query: NeighbourQuery) -> str:
    """A short name: "row 17", "image 3", or the file name of an image file."""
    return query.source if query.row is not None or query.image is not None else Path(query.path).name


def _clip(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def inside_folder(root: Path, name: str) -> Path:
    """``root/name``, refused if it resolves outside ``root`` (e.g. through a symlink)."""
    path = root / name
    if not path.resolve().is_relative_to(root):
        raise IsdError(f"report file {path} would be written outside {root}")
    return path


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_thumb(root: Path, name: str, picture: Image.Image | None) -> str:
    """Save ``picture`` as ``root/name`` (the shared placeholder when it is None); returns the name used."""
    if picture is None:
        name, picture = MISSING, fit(None, THUMB)
    save_png(picture, inside_folder(root, name))
    return name


# ------------------------------------------------------------------------------------------ pages
@dataclass
class _Pictures:
    """The picture of every query and neighbour row of a report, loaded once; counts the missing."""

    source: ImageSource
    rows: dict[int, Image.Image | None] = field(default_factory=dict)
    queries: dict[int, Image.Image | None] = field(default_factory=dict)

    def row(self, row: int, index: int, path: str) -> Image.Image | None:
        if row not in self.rows:
            image = self.source.row(index, path)
            self.rows[row] = None if image is None else fit(image, THUMB)
        return self.rows[row]

    def query(self, number: int, query: NeighbourQuery) -> Image.Image | None:
        if query.row is not None and query.index is not None:
            return self.row(query.row, query.index, query.path)
        if number not in self.queries:
            image = self.source.query(query)
            self.queries[number] = None if image is None else fit(image, THUMB)
        return self.queries[number]

    @property
    def missing(self) -> int:
        return sum(image is None for image in [*self.rows.values(), *self.queries.values()])


def _tile(
    page: Image.Image,
    xy: tuple[int, int],
    picture: Image.Image | None,
    lines: list[str],
    colour: tuple[int, int, int],
    width: int,
) -> None:
    """One tile at ``xy``: the picture framed ``width`` px in ``colour``, two caption lines below."""
    x, y = xy
    draw = ImageDraw.Draw(page)
    draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=colour)
    page.paste(fit(picture, TILE - 2 * width), (x + width, y + width))
    font = load_font(11)
    for k, line in enumerate(lines[:2]):
        fill = WRONG_COLOUR if colour == WRONG_COLOUR and k == 1 else (40, 40, 40)
        draw.text((x, y + TILE + 2 + 13 * k), _clip(draw, line, TILE, font), fill=fill, font=font)


def render_page(
    results: Sequence[NeighbourResult], first: int, pictures: _Pictures, classes: Sequence[str], k: int
) -> Image.Image:
    """A grid: one line per query (query tile, gap, neighbour tiles); ``first`` numbers the queries."""
    width = PAD + TILE + GAP + k * (TILE + PAD)
    height = PAD + len(results) * (TILE + CAPTION + PAD)
    page = Image.new("RGB", (width, height), BACKGROUND)
    for line, result in enumerate(results):
        y = PAD + line * (TILE + CAPTION + PAD)
        query, number = result.query, first + line
        caption = [f"#{number + 1} {_query_name(query)}", class_name(query.label, classes)]
        _tile(page, (PAD, y), pictures.query(number, query), caption, QUERY_COLOUR, 4)
        for j, hit in enumerate(result.hits):
            picture = pictures.row(hit.row, hit.index, hit.path)
            wrong = hit.label_differs is True
            caption = [f"{hit.score:.3f}", class_name(hit.label, classes)]
            x = PAD + TILE + GAP + j * (TILE + PAD)
            _tile(page, (x, y), picture, caption, WRONG_COLOUR if wrong else PLAIN_COLOUR, 3 if wrong else 1)
    return page


# ------------------------------------------------------------------------------------------- html
def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell(css: str, thumb: str, lines: list[str], title: str, cls_line: int) -> str:
    text = "<br>".join(
        f'<span class="cls">{_e(line)}</span>' if k == cls_line else _e(line) for k, line in enumerate(lines)
    )
    return f'<td class="{css}"><img src="{_e(thumb)}" alt="{_e(title)}" title="{_e(title)}">{text}</td>'


def render_html(
    results: Sequence[NeighbourResult],
    thumbs: dict[tuple[str, int], str],
    pages: list[str],
    classes: Sequence[str],
    title: str,
    map_name: str = "",
) -> str:
    """``index.html``: every query and its neighbours, a class filter, links to the PNG pages (and the
    bank's map, when ``map_name`` names it)."""
    k = max((len(r.hits) for r in results), default=0)
    counts: dict[int, int] = {}
    for result in results:
        counts[result.query.label] = counts.get(result.query.label, 0) + 1
    options = "".join(
        f'<option value="{label}">{_e(class_name(label, classes))} ({n})</option>'
        for label, n in sorted(counts.items())
    )
    lines = []
    for number, result in enumerate(results):
        query = result.query
        q_thumb = thumbs[("row", query.row)] if query.row is not None else thumbs[("query", number)]
        where = query.path if query.row is None else f"row {query.row}: {query.path}"
        caption = [_query_name(query), class_name(query.label, classes)]
        cells = [_cell("query", q_thumb, caption, where, 1)]
        for hit in result.hits:
            css = "hit wrong" if hit.label_differs is True else "hit"
            caption = [f"{hit.score:.3f}", class_name(hit.label, classes), f"row {hit.row}"]
            cells.append(_cell(css, thumbs[("row", hit.row)], caption, hit.path, 1))
        lines.append(f'<tr data-cls="{query.label}"><th>#{number + 1}</th>{"".join(cells)}</tr>')
    wrong = sum(h.label_differs is True for r in results for h in r.hits)
    known = sum(h.label_differs is not None for r in results for h in r.hits)
    summary = f"{len(results)} queries, k = {k}" + (
        f", {wrong} of {known} labelled neighbours of another class" if known else ""
    )
    links = " ".join(f'<a href="{_e(name)}">{n + 1}</a>' for n, name in enumerate(pages))
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    policy = f"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
        f"<title>Nearest neighbours: {_e(title)}</title>\n<style>{REPORT_STYLE}</style></head>\n<body>\n"
        f"<h1>Nearest neighbours: {_e(title)}</h1>\n<p>{_e(summary)}. PNG pages: {links}</p>\n"
        + (
            f'<figure><img id="map" src="{_e(map_name)}" alt="map of the bank" width="750">'
            "<figcaption>The bank, coloured by class; the queries' rows and neighbours ringed."
            "</figcaption></figure>\n"
            if map_name
            else ""
        )
        + '<p id="filter" hidden><label>Query class <select id="cls">'
        f'<option value="all">all ({len(results)})</option>{options}</select></label> '
        '<span id="shown"></span></p>\n'
        "<table>\n" + "\n".join(lines) + "\n</table>\n"
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )


# ------------------------------------------------------------------------------------------ write
def write_report(
    results: Sequence[NeighbourResult],
    out_dir: str | Path,
    *,
    classes: Sequence[str] = (),
    images: ImageSource | None = None,
    per_page: int = 8,
    title: str = "",
    map_name: str = "",
) -> Report:
    """Write PNG pages, thumbnails and ``index.html`` (last) for ``results`` into ``out_dir``.

    ``classes`` name the labels; ``images`` finds the pictures (default: files and PIL images only);
    ``map_name``: a map already written into ``out_dir``, shown in ``index.html``.
    """
    if per_page < 1:
        raise IsdError(f"per_page must be at least 1, got {per_page}")
    if not results:
        raise IsdError("no neighbour results to report")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IsdError(f"report folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    (root / "index.html").unlink(missing_ok=True)  # unfinished until the new one lands
    pictures = _Pictures(images or ImageSource(""))
    k = max(len(r.hits) for r in results)

    pages = []
    for p, first in enumerate(range(0, len(results), per_page)):
        page = render_page(results[first : first + per_page], first, pictures, classes, k)
        name = f"page-{p + 1:03d}.png"
        save_png(page, inside_folder(root, name))
        pages.append(name)

    thumbs: dict[tuple[str, int], str] = {}
    for number, result in enumerate(results):
        if result.query.row is None:
            picture = pictures.query(number, result.query)
            thumbs[("query", number)] = write_thumb(root, f"thumbs/q{number}.png", picture)
    for row, picture in pictures.rows.items():
        thumbs[("row", row)] = write_thumb(root, f"thumbs/r{row}.png", picture)

    document = render_html(results, thumbs, pages, classes, title, map_name)
    with atomic_path(inside_folder(root, "index.html")) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return Report(
        root, root / "index.html", [root / name for name in pages], pictures.missing, pictures.source.problem
    )


def neighbours_report(
    retriever: Retriever,
    queries: Sequence[QueryItem],
    out_dir: str | Path,
    *,
    k: int = 10,
    per_page: int = 8,
    map_rows: int = 0,
    map_method: str = "auto",
) -> tuple[list[NeighbourResult], Report]:
    """The k nearest bank rows of ``queries`` in ``retriever``'s index, written as a report to ``out_dir``
    (pictures from the bank's data SPEC); with ``map_rows`` > 0 also ``map.png``, a map of that many bank
    rows (plus every query row and neighbour, ringed). Returns the results and what was written."""
    results = retriever.neighbours(queries, k)
    map_name = ""
    if map_rows > 0:
        shown = {r.query.row for r in results if r.query.row is not None} | {
            h.row for r in results for h in r.hits
        }
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise IsdError(f"report folder {out} is a file")
        out.mkdir(parents=True, exist_ok=True)
        title = retriever.index_dir.name
        bank = retriever.index.bank.path
        map_png(
            bank, out / "map.png", title=title, max_rows=map_rows, method=map_method, include=sorted(shown)
        )
        map_name = "map.png"
    report = write_report(
        results,
        out_dir,
        classes=retriever.classes,
        images=ImageSource(retriever.index.bank.data_spec),
        per_page=per_page,
        title=str(retriever.index_dir),
        map_name=map_name,
    )
    return results, report
