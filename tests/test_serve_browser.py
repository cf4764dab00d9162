"""The search page in headless Chromium (Playwright, the system browser) against a real server: upload an
image, see its neighbours, click through, switch index, filter by class, random rows; hostile file and
class names stay text; a screenshot shows the thumbnails."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_test_index
from PIL import Image
from serving import CLASS_PAYLOAD, PAYLOAD, hostile_folder, serving

from isdretrieve.cli.index import main as index_cli
from isdretrieve.data.open import open_dataset
from isdretrieve.retrieve.pictures import tensor_to_pil
from isdretrieve.retrieve.retriever import Retriever

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("ISD_SERVE_SCREENSHOT", "")  # also save the page's screenshot here


@pytest.fixture(scope="module")
def indices(tmp_path_factory, digits_test_index):
    root = tmp_path_factory.mktemp("page")
    hostile = build_test_index(root, f"folder:{hostile_folder(root / 'data')}", name="hostile")
    shutil.copytree(digits_test_index, root / "digits")  # served under the name "digits"
    return {"digits": root / "digits", "hostile": hostile}


@pytest.fixture(scope="module")
def server(indices):
    with serving([indices["digits"], indices["hostile"]]) as running:
        yield running


@pytest.fixture(scope="module")
def browser(chromium_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("ISD_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail("ISD_REQUIRE_BROWSER is set but playwright is not installed")
        pytest.skip("playwright is not installed")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium_path, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    opened.console_messages = []
    opened.on("console", lambda message: opened.console_messages.append(message.text))
    opened.goto(server.url + "/")
    opened.wait_for_selector("#rows .tile img")  # the first index's random rows are shown
    yield opened
    context.close()


def _hit_rows(page) -> list[int]:
    return [int(row) for row in page.eval_on_selector_all(".hits .tile", "ts => ts.map(t => t.dataset.row)")]


def _all_pictures_loaded(page) -> bool:
    return page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")


def test_upload_shows_neighbours_and_a_click_searches_from_one(page, indices, tmp_path):
    digits = open_dataset("digits", split="test")
    query = tmp_path / "query.png"
    tensor_to_pil(digits[0][0]).save(query)
    page.set_input_files("#file", str(query))
    page.wait_for_function("() => document.querySelectorAll('.hits .tile').length === 10")
    retriever = Retriever.open(indices["digits"], device="cpu")
    expected = retriever.search(digits.load_all()[:1], k=10)[0]
    assert _hit_rows(page) == [h.row for h in expected]
    scores = page.eval_on_selector_all(".hits .score", "s => s.map(e => e.textContent)")
    classes = page.eval_on_selector_all(".hits .cls", "s => s.map(e => e.textContent)")
    assert scores == [f"{h.score:.3f}" for h in expected] and scores[0] == "1.000"
    assert classes == [str(h.label) for h in expected]
    assert page.text_content(".result .query .where") == "query.png"
    assert page.locator(".tile.other").count() == 0  # an upload has no label: nothing is marked

    second = expected[1].row
    page.click(f".hits .tile[data-row='{second}']")
    page.wait_for_function(
        f"() => document.querySelector('.result .query .where').textContent === 'row {second}'"
    )
    found = retriever.neighbours([second], k=10)[0]
    assert _hit_rows(page) == [h.row for h in found.hits]
    marked = [
        int(r) for r in page.eval_on_selector_all(".hits .tile.other", "ts => ts.map(t => t.dataset.row)")
    ]
    assert marked == [h.row for h in found.hits if h.label_differs]  # other-class neighbours are framed
    assert "of another class" in page.text_content(".summary")
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
    assert _all_pictures_loaded(page)
    assert not [m for m in page.console_messages if "Content Security Policy" in m]


def test_screenshot_shows_the_thumbnails(page, browser, server, tmp_path):
    page.click("#rows .tile")  # a random row's neighbours above the random rows
    page.wait_for_function("() => document.querySelectorAll('.hits .tile').length === 10")
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
    assert _all_pictures_loaded(page)
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)
    # the same page with every thumbnail refused: the check below must tell the two apart
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    bare = context.new_page()
    bare.route("**/thumb.png", lambda route: route.abort())
    bare.goto(server.url + "/")
    bare.wait_for_selector("#rows .tile")
    bare.click("#rows .tile")
    bare.wait_for_function("() => document.querySelectorAll('.hits .tile').length === 10")
    bare.screenshot(path=str(tmp_path / "bare.png"))
    context.close()
    pixels, control = (np.asarray(Image.open(p).convert("RGB")) for p in (shot, tmp_path / "bare.png"))
    assert pixels.shape == control.shape == (900, 1200, 3)
    # the digits' black backgrounds cover a good part of the page; text and frames alone cover little
    dark, dark_control = (float((x.mean(axis=2) < 60).mean()) for x in (pixels, control))
    assert dark > 0.1 and dark_control < 0.02, (dark, dark_control)


def test_switch_index_filter_by_class_and_random_rows(page):
    page.select_option("#index", "hostile")
    page.wait_for_function("() => document.querySelector('#cls').options.length === 3")
    options = page.eval_on_selector_all("#cls option", "os => os.map(o => o.textContent)")
    assert options == ["all classes", CLASS_PAYLOAD, "plain"]
    page.wait_for_function("() => document.querySelectorAll('#rows .tile').length === 13")
    page.select_option("#cls", label="plain")
    page.wait_for_function("() => document.querySelectorAll('#rows .tile').length === 10")
    assert set(page.eval_on_selector_all("#rows .cls", "s => s.map(e => e.textContent)")) == {"plain"}

    page.select_option("#index", "digits")
    page.wait_for_function("() => document.querySelector('#cls').options.length === 11")
    page.wait_for_function("() => document.querySelectorAll('#rows .tile').length === 24")
    page.select_option("#cls", "7")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#rows .cls')).every(e => e.textContent === '7')"
        " && document.querySelectorAll('#rows .tile').length === 24"
    )
    rows = (
        "() => JSON.stringify(Array.from(document.querySelectorAll('#rows .tile')).map(t => t.dataset.row))"
    )
    before = page.evaluate(rows)
    page.click("#random")
    page.wait_for_function(f"(before) => ({rows})() !== before", arg=before)
    page.wait_for_function("() => document.querySelectorAll('#rows .tile').length === 24")
    assert set(page.eval_on_selector_all("#rows .cls", "s => s.map(e => e.textContent)")) == {"7"}


def test_hostile_file_and_class_names_run_nothing(page, browser, tmp_path):
    page.select_option("#index", "hostile")
    page.wait_for_function("() => document.querySelectorAll('#rows .tile').length === 13")
    upload = tmp_path / f"{PAYLOAD}.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(upload)
    page.set_input_files("#file", str(upload))
    page.wait_for_function("() => document.querySelectorAll('.hits .tile').length === 10")
    page.click(".hits .tile")  # a row query shows the row's class and path too
    page.wait_for_function(
        "() => document.querySelector('.result .query .where').textContent.startsWith('row ')"
    )
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
    tiles = page.locator(".tile").count()
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.body.getAttribute('data-pwned')") is None
    assert page.locator("img").count() == tiles and page.locator("svg").count() == 0
    texts = page.eval_on_selector_all("#rows .cls", "s => s.map(e => e.textContent)")
    titles = page.eval_on_selector_all("#rows .tile", "ts => ts.map(t => t.title)")
    assert CLASS_PAYLOAD in texts and f"{CLASS_PAYLOAD}/{PAYLOAD}.png" in titles
    assert CLASS_PAYLOAD in page.eval_on_selector_all("#cls option", "os => os.map(o => o.textContent)")
    # the same payloads as markup do run in this browser, so the checks above can fail
    context = browser.new_context()
    control = context.new_page()
    control.set_content(f"<body>{PAYLOAD}{CLASS_PAYLOAD}</body>")
    control.wait_for_function("() => window.__pwned !== undefined")
    assert control.evaluate("document.body.getAttribute('data-pwned')") == "1"
    context.close()


def test_a_token_server_page_asks_for_the_token_then_works(browser, indices):
    token = "a-long-enough-test-token"
    with serving([indices["digits"]], token=token) as running:
        context = browser.new_context()
        page = context.new_page()
        page.goto(running.url + "/")
        page.wait_for_selector("#token-form:not([hidden])")
        assert "token is required" in page.text_content("#error")
        page.fill("#token", token)
        page.click("#token-form button")  # sets the cookie and reloads
        page.wait_for_selector("#rows .tile img")
        assert page.locator("#rows .tile").count() == 24 and page.is_hidden("#token-form")
        other = context.new_page()  # a wrong token given in the address: it moves into the cookie
        other.goto(running.url + "/#token=wrong-token-wrong-token")
        other.wait_for_selector("#token-form:not([hidden])")
        assert "wrong token" in other.text_content("#error") and "#" not in other.url
        context.close()


def test_the_class_filter_applies_to_searches(page, indices):
    """The class chosen for browsing filters searches too: a row whose neighbours span classes shows only
    neighbours of the chosen class once it is chosen."""
    with Retriever.open(indices["digits"]) as r:
        rows = [
            row
            for row in r.sample_rows(450, label=7)
            if {h.label for h in r.neighbours([row], k=10)[0].hits} != {7}
        ]
    assert rows, "every class-7 row has only class-7 neighbours: the filter would show nothing"
    page.evaluate(f"searchRow({rows[0]})")  # the page's own search of a row, as a click runs it
    page.wait_for_function("() => document.querySelectorAll('.hits .tile').length === 10")
    assert set(page.eval_on_selector_all(".hits .cls", "s => s.map(e => e.textContent)")) != {"7"}
    page.select_option("#cls", "7")
    page.evaluate(f"searchRow({rows[0]})")
    page.wait_for_function(
        "() => document.querySelectorAll('.hits .tile').length === 10"
        " && Array.from(document.querySelectorAll('.hits .cls')).every(e => e.textContent === '7')"
    )


def _hues(png: bytes) -> int:
    """How many distinct saturated colours a picture holds (a class-coloured map has ten or more)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len({c for _, c in image.getcolors(1 << 20) if max(c) - min(c) > 60})


@pytest.mark.slow
def test_the_map_link_opens_a_drawn_map(page):
    """The page's "map of the bank" link leads to the map page, whose picture loads and shows the classes."""
    page.click("#map-link")  # the layout is computed on this first request (UMAP's first call compiles)
    loaded = "() => document.images.length === 1 && document.images[0].complete"
    page.wait_for_function(loaded, timeout=240_000)
    assert page.evaluate("document.images[0].naturalWidth") == 750
    assert "all 450 bank rows" in page.text_content("p")
    assert _hues(page.locator("img").screenshot()) >= 10


def test_the_report_shows_its_map(browser, digits_test_index, tmp_path):
    """A neighbours report written with --map shows the picture in the browser; without its file, the
    same page shows none (what the checks above tell apart)."""
    out = tmp_path / "report"
    args = ["neighbours", digits_test_index, "--sample", 2, "-k", 3, "--map", 150, "--map-method", "tsne"]
    assert CliRunner().invoke(index_cli, [str(a) for a in [*args, "--out", out]]).exit_code == 0
    shutil.copytree(out, tmp_path / "bare")
    (tmp_path / "bare" / "map.png").unlink()
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    shown = []
    for folder in (out, tmp_path / "bare"):
        one = context.new_page()
        one.goto((folder / "index.html").as_uri())
        one.wait_for_function("() => document.getElementById('map').complete")
        shown.append(one.evaluate("document.getElementById('map').naturalWidth"))
        if folder == out:
            assert _hues(one.locator("#map").screenshot()) >= 10
    context.close()
    assert shown == [750, 0]
