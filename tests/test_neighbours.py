"""Nearest-neighbour inspection on real indices: ``Retriever.neighbours`` against ``SearchIndex.search`` and
NumPy, the PNG/HTML report (digits rendered from the data set, CIFAR-10 through ``isd-index neighbours``),
and headless Chromium: the page shows its images, and file or class names carrying HTML run nothing."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isdretrieve.cli.index import main as index_cli
from isdretrieve.data.open import open_dataset
from isdretrieve.errors import DataError, IsdError, QueryError
from isdretrieve.pipeline import build_index_from_checkpoint
from isdretrieve.retrieve.pictures import THUMB, ImageSource, fit, tensor_to_pil
from isdretrieve.retrieve.queries import parse_query_spec
from isdretrieve.retrieve.report import QUERY_COLOUR, TILE, WRONG_COLOUR, write_report
from isdretrieve.retrieve.retriever import Retriever

PAYLOAD = "<img src=x onerror=\"document.title='pwned';document.body.setAttribute('data-pwned','1')\">"
CLASS_PAYLOAD = "<svg onload=\"document.body.setAttribute('data-cls-pwned','1')\">"


def _index(root: Path, data: str, image_size: int, make_encoder) -> Path:
    """An exact index over ``data`` with a random-init small CNN (fixed seed), built through the pipeline."""
    encoder = make_encoder(root / "enc.pt", image_size=image_size)
    build_index_from_checkpoint(encoder, data, root / "index", factory="Flat", workers=0)
    return root / "index"


@pytest.fixture(scope="module")
def digits_index(tmp_path_factory, make_encoder) -> Path:
    return _index(tmp_path_factory.mktemp("digits"), "digits,split=test", 16, make_encoder)


@pytest.fixture(scope="module")
def cifar_index(tmp_path_factory, cifar_root, make_encoder) -> Path:
    """An index over 20 CIFAR-10 test images of each class (a real folder: data set, 200 JPEG files)."""
    root = tmp_path_factory.mktemp("cifar")
    for folder in sorted((cifar_root / "test").iterdir()):
        (root / "data" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:20]:
            shutil.copy(image, root / "data" / folder.name / image.name)
    return _index(root, f"folder:{root / 'data'}", 32, make_encoder)


@pytest.fixture
def browser(chromium_path) -> str:
    """Path of headless Chromium (conftest's ``chromium_path``: a failure under ISD_REQUIRE_BROWSER)."""
    return chromium_path


def _chromium(browser: str, profile: Path, page: Path, *args: str, fragment: str = "") -> str:
    """Run headless Chromium on the file ``page`` (and ``#fragment``) in a fresh profile; returns stdout."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
        *args,
        page.resolve().as_uri() + (f"#{fragment}" if fragment else ""),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _colours(pixels: np.ndarray) -> int:
    """Number of distinct RGB colours in an [H,W,3] uint8 array."""
    rgb = pixels.reshape(-1, 3).astype(np.int32)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


def _save(images: torch.Tensor, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        tensor_to_pil(image).save(folder / name)
    return [folder / name for name in names]


# ------------------------------------------------------------------------------------------- API
def test_row_queries_match_search_index_and_numpy(digits_index):
    r = Retriever.open(digits_index)
    bank = r.index.bank
    feats, labels = bank.features().astype(np.float64), bank.labels()
    indices, paths = bank.indices(), bank.paths()
    rows = [0, 17, 42, len(bank) - 1]
    results = r.neighbours(rows, k=5)
    assert [res.query.row for res in results] == rows
    for row, res in zip(rows, results, strict=True):
        q = res.query
        assert (q.source, q.index, q.label, q.path) == (f"row {row}", indices[row], labels[row], paths[row])
        found = [h.row for h in res.hits]
        _, searched = r.index.search(bank.features(row, row + 1), 6)
        assert found == [x for x in searched[0].tolist() if x != row][:5]  # self left out
        sims = feats @ feats[row]
        sims[row] = -np.inf
        np.testing.assert_allclose([h.score for h in res.hits], np.sort(sims)[::-1][:5], atol=1e-5)
        np.testing.assert_allclose([h.score for h in res.hits], sims[found], atol=1e-5)
        for h in res.hits:
            assert (h.index, h.label, h.path) == (indices[h.row], labels[h.row], paths[h.row])
            assert h.label_differs == (labels[h.row] != labels[row])
    r.index.close()


def test_image_path_folder_and_pil_queries(digits_index, tmp_path):
    r = Retriever.open(digits_index)
    images = open_dataset("digits", split="test").load_all()[:3]
    files = _save(images, tmp_path / "q", ["c.png", "a.png", "b.png"])
    by_folder = r.neighbours(tmp_path / "q", k=4)
    assert [res.query.path for res in by_folder] == [
        str(tmp_path / "q" / n) for n in ("a.png", "b.png", "c.png")
    ]
    mixed = r.neighbours([files[0], Image.open(files[1]), 2], k=4)
    assert [res.query.source for res in mixed] == [str(files[0]), "image 1", "row 2"]
    assert mixed[1].query.path == "" and mixed[1].query.image is not None
    searched = r.search(files, k=4)
    for res, hits in zip(
        [by_folder[2], by_folder[0], mixed[0], mixed[1]], [*searched[:2], *searched[:2]], strict=True
    ):
        assert res.query.row is None and res.query.label == -1
        assert [h.row for h in res.hits] == [h.row for h in hits]
        assert all(h.label_differs is None for h in res.hits)  # the query's label is unknown
    assert mixed[0].hits[0].index == 0 and abs(mixed[0].hits[0].score - 1) < 1e-4  # each image finds itself
    r.index.close()


def test_query_specs_sampling_and_bad_queries(digits_index, tmp_path):
    r = Retriever.open(digits_index)
    assert parse_query_spec("0, 17,42") == parse_query_spec("rows:0,17,42") == [0, 17, 42]
    sample = r.sample_rows(10, seed=3)
    assert sample == r.sample_rows(10, seed=3) == sorted(set(sample)) and len(sample) == 10
    assert sample != r.sample_rows(10, seed=4) and len(r.sample_rows(10**6)) == len(r.index)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for bad, k, error, message in [
        ([len(r.index)], 3, QueryError, "unknown bank row"),
        ([-1], 3, QueryError, "unknown bank row"),
        ([0], 0, QueryError, "k must be between 1"),
        ([0], len(r.index), QueryError, "k must be between 1"),
        ([tmp_path / "missing.png"], 3, DataError, "not found"),
        ([tmp_path / "empty"], 3, DataError, "holds no images"),
        ([], 3, QueryError, "no queries"),
    ]:
        with pytest.raises(error, match=message):
            r.neighbours(bad, k)
    with pytest.raises(QueryError, match="bad row list"):
        parse_query_spec("rows:1,x")
    with pytest.raises(QueryError, match="empty query SPEC"):
        parse_query_spec(" ")
    with pytest.raises(QueryError, match="at least 1"):
        r.sample_rows(0)
    r.index.close()


# ---------------------------------------------------------------------------------------- report
def test_digits_report_renders_from_the_data_set(digits_index, tmp_path):
    """Digits live in memory (bank paths are "0", "1", ...): pictures must come from the data SPEC."""
    r = Retriever.open(digits_index)
    results = r.neighbours([0, 17], k=3)
    data = open_dataset(r.index.bank.data_spec)
    report = write_report(
        results, tmp_path / "rep", classes=r.classes, images=ImageSource(r.index.bank.data_spec), per_page=1
    )
    assert report.missing == 0 and [p.name for p in report.pages] == ["page-001.png", "page-002.png"]
    for hit in results[0].hits:
        thumb = np.asarray(Image.open(tmp_path / "rep" / "thumbs" / f"r{hit.row}.png"))
        expected = np.asarray(fit(tensor_to_pil(data[hit.index][0]), THUMB))
        assert not Path(hit.path).exists() and np.array_equal(thumb, expected)
    page = Image.open(report.pages[0]).convert("RGB")
    assert page.getpixel((6, 6)) == QUERY_COLOUR  # the query tile's frame
    # without its data set the pictures are placeholders, counted, and the report still completes
    lost = write_report(results, tmp_path / "lost", images=ImageSource("folder:/nonexistent/data"))
    shown = {row for res in results for row in [res.query.row, *(h.row for h in res.hits)]}
    assert lost.missing == len(shown) and "does not exist" in lost.problem and lost.index_html.is_file()
    assert 'src="thumbs/missing.png"' in lost.index_html.read_text()
    # files stay inside the report folder, also when a folder in it links elsewhere
    (tmp_path / "outside").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "thumbs").symlink_to(tmp_path / "outside")
    with pytest.raises(IsdError, match="outside"):
        write_report(results, tmp_path / "linked", images=ImageSource(r.index.bank.data_spec))
    assert not any((tmp_path / "outside").iterdir()) and not (tmp_path / "linked" / "index.html").exists()
    r.index.close()


def test_cli_digits_table_and_bad_input(digits_index, tmp_path):
    runner = CliRunner()
    images = open_dataset("digits", split="test").load_all()[:2]
    _save(images, tmp_path / "q", ["a.png", "b.png"])
    args = ["neighbours", str(digits_index), "--query", "0,17", "--query", str(tmp_path / "q"), "-k", "4"]
    wide = {"COLUMNS": "250"}  # the query paths (pytest's tmp dir) would otherwise wrap inside "a.png"
    result = runner.invoke(index_cli, [*args, "--out", str(tmp_path / "rep")], env=wide)
    assert result.exit_code == 0, result.output
    assert "row 17" in result.output and "a.png" in result.output and "labelled neighbours" in result.output
    assert f"report: {tmp_path / 'rep' / 'index.html'}" in result.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("<tr data-cls=") == 4 and (tmp_path / "rep" / "thumbs" / "q2.png").is_file()
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "bad")]
    for bad, message in [
        (["--query", "450"], "unknown bank row 450"),
        (["--query", str(tmp_path / "missing.png")], "query image not found"),
        (["--query", "0", "-k", "0"], "'-k': 0 is not in the range x>=1"),
        (["--query", str(tmp_path / "empty")], "holds no images"),
        (["--sample", "0"], "'--sample': 0 is not in the range x>=1"),
        (["--sample", "3", "--per-page", "0"], "'--per-page': 0 is not in the range x>=1"),
    ]:
        result = runner.invoke(index_cli, ["neighbours", str(digits_index), *bad, *out])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    both = runner.invoke(index_cli, ["neighbours", str(digits_index), "--query", "0", "--sample", "2", *out])
    assert both.exit_code == 2 and "--query SPEC" in both.output
    assert not (tmp_path / "bad" / "index.html").exists()


@pytest.mark.cifar
def test_cli_cifar_sample_writes_pages_and_html(cifar_index, tmp_path):
    out = tmp_path / "rep"
    args = ["neighbours", str(cifar_index), "--sample", "12", "--seed", "1", "-k", "6", "--out", str(out)]
    result = CliRunner().invoke(index_cli, args)
    assert result.exit_code == 0, result.output
    r = Retriever.open(cifar_index)
    results = r.neighbours(r.sample_rows(12, seed=1), k=6)
    r.index.close()
    pages = sorted(p.name for p in out.glob("page-*.png"))
    assert pages == ["page-001.png", "page-002.png"]  # 8 + 4 queries
    first = Image.open(out / "page-001.png").convert("RGB")
    assert first.size == (6 + TILE + 16 + 6 * (TILE + 6), 6 + 8 * (TILE + 30 + 6))
    assert (
        len(np.unique(np.asarray(first).reshape(-1, 3), axis=0)) > 2000
    )  # colour photographs, not placeholders
    wrong = [(q, j) for q, res in enumerate(results[:8]) for j, h in enumerate(res.hits) if h.label_differs]
    assert wrong  # a random encoder confuses classes
    q, j = wrong[0]
    assert first.getpixel((6 + TILE + 16 + j * (TILE + 6), 6 + q * (TILE + 36))) == WRONG_COLOUR
    text = (out / "index.html").read_text()
    assert text.count("<tr data-cls=") == 12
    assert text.count('class="hit wrong"') == sum(h.label_differs is True for r in results for h in r.hits)
    for label in {res.query.label for res in results}:
        assert f'<option value="{label}">{r.classes[label]} (' in text
    thumbs = {p.name for p in (out / "thumbs").iterdir()}
    assert thumbs == {f"r{row}.png" for res in results for row in [res.query.row, *(h.row for h in res.hits)]}


# --------------------------------------------------------------------------------------- browser
@pytest.mark.cifar
def test_browser_shows_the_report_images(cifar_index, tmp_path, browser):
    out = tmp_path / "rep"
    args = ["neighbours", str(cifar_index), "--sample", "6", "-k", "8", "--out", str(out)]
    assert CliRunner().invoke(index_cli, args).exit_code == 0
    shot = tmp_path / "report.png"
    _chromium(browser, tmp_path / "p1", out / "index.html", f"--screenshot={shot}")
    # the same page with its thumbnails gone: the check below must tell the two apart
    shutil.copytree(out, tmp_path / "bare", ignore=shutil.ignore_patterns("thumbs"))
    bare = tmp_path / "bare.png"
    _chromium(browser, tmp_path / "p2", tmp_path / "bare" / "index.html", f"--screenshot={bare}")
    pixels, control = (np.asarray(Image.open(p).convert("RGB")) for p in (shot, bare))
    assert pixels.shape == control.shape == (900, 1200, 3)
    assert _colours(pixels) > 3000 and _colours(pixels) > 10 * _colours(control)
    assert _colours(control) < 3000  # text, frames and broken-image icons do not pass for pictures


def test_browser_runs_no_script_from_file_or_class_names(tmp_path, browser, make_encoder):
    rng = np.random.default_rng(0)
    names = {
        "plain": [f"{k}.png" for k in range(8)],
        CLASS_PAYLOAD: [f"{PAYLOAD}.png", "x.png", "y.png", "z.png"],
    }
    for cls, files in names.items():
        (tmp_path / "data" / cls).mkdir(parents=True)
        for name in files:
            colour = rng.integers(0, 256, size=(1, 1, 3), dtype=np.uint8)
            pixels = np.clip(colour + rng.integers(0, 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / name)
    index = _index(tmp_path, f"folder:{tmp_path / 'data'}", 32, make_encoder)
    out = tmp_path / "rep"
    args = ["neighbours", str(index), "--query", str(tmp_path / "data" / CLASS_PAYLOAD), "--query", "0,1"]
    result = CliRunner().invoke(index_cli, [*args, "-k", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (out / "thumbs").iterdir()} <= {f"q{k}.png" for k in range(4)} | {
        f"r{k}.png" for k in range(12)
    }  # named by counters, never by the files' names
    text = (out / "index.html").read_text()
    assert "<img src=x" not in text and "<svg" not in text and 'onerror="' not in text
    assert html.escape(PAYLOAD, quote=True) in text and html.escape(CLASS_PAYLOAD, quote=True) in text

    dom = _chromium(browser, tmp_path / "p1", out / "index.html", "--dump-dom", fragment="cls=0")
    body, title = re.search(r"<body[^>]*>", dom).group(0), re.search(r"<title>(.*?)</title>", dom, re.S)
    assert "pwned" not in body and title.group(1).startswith("Nearest neighbours")
    # the report's own script did run: the filter shows, and #cls=0 left only the class-0 queries (rows 0, 1)
    assert re.search(r'<p id="filter"[^>]*>', dom).group(0) == '<p id="filter">'
    assert re.findall(r"<tr ([^>]*)>", dom) == ['data-cls="-1" hidden=""'] * 4 + ['data-cls="0"'] * 2
    assert "2 of 6 queries" in dom
    # the same payload unescaped does run, so the checks above can fail
    (tmp_path / "control.html").write_text(f"<!doctype html><html><head></head><body>{PAYLOAD}</body></html>")
    dom = _chromium(browser, tmp_path / "p2", tmp_path / "control.html", "--dump-dom")
    assert 'data-pwned="1"' in re.search(r"<body[^>]*>", dom).group(0) and "<title>pwned</title>" in dom
