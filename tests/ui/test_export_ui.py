"""The top-k panel's CSV download in a real Chromium against a real Panel server."""

from __future__ import annotations

import csv
import io
import os
import shutil

import pytest
from conftest import CHROMIUM

pytestmark = pytest.mark.ui

pytest.importorskip("playwright.sync_api")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402
from test_explorer_ui import FINE, S, hover_cell, open_app  # noqa: E402  (puts the repository on sys.path)

from bench.servers import serve_explorer  # noqa: E402

K = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from hoverlay.stores import LayerGeometry
    from hoverlay.stores.synthetic import make_synthetic_store

    url = str(tmp_path_factory.mktemp("ui-export") / "store")
    make_synthetic_store(url, 16, layers={"fine": LayerGeometry(*FINE, 16)}, image_size=S, chunk=8,
                         labels=("=cat", "dog"))
    server = serve_explorer([url], "--page-size", "8", "--ncols", "4", "-k", str(K), "--tile-px", "90",
                            log_dir=tmp_path_factory.mktemp("logs"), timeout=60)
    yield server.url
    server.stop()


def test_the_download_button_serves_the_shown_hits_as_csv(browser, server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 1300}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    try:
        open_app(page, server)
        button = page.get_by_role("button", name="Download top-k CSV")
        assert button.is_disabled()  # nothing to download before the first search
        hover_cell(page, 3, (5, 2))
        items = page.locator(".topk-item")
        items.nth(K - 1).wait_for()
        expect(button).to_be_enabled()
        shown = [tuple(items.nth(i).get_attribute(a) for a in ("data-image", "data-y", "data-x"))
                 for i in range(K)]
        with page.expect_download() as download:
            button.click()
        assert download.value.suggested_filename == "hoverlay-topk.csv"
        with open(download.value.path(), encoding="utf-8") as f:
            rows = list(csv.DictReader(io.StringIO(f.read())))
        assert [(r["image"], r["y"], r["x"]) for r in rows] == shown
        assert rows[0]["rank"] == "1" and float(rows[0]["score"]) == pytest.approx(1.0, abs=2e-3)
        assert {r["label"] for r in rows} <= {"'=cat", "dog"}  # no formula reaches a spreadsheet
    finally:
        ctx.close()


def test_a_search_that_ends_before_the_cards_component_rendered_breaks_nothing_in_the_page(browser, server):
    """The cards' module arrives late (held here until the first hits came; on a loaded machine
    it can): the hits, which enable the download button, reach a component that drew nothing yet.
    No error escapes into the page (one thrown while applying a message drops that message's
    later changes), and the cards and the enabled button show once the module runs."""
    ctx = browser.new_context(viewport={"width": 1500, "height": 1300})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    held: list = []
    try:
        page.route("**/topk_cards.js*", lambda route: held.append(route))  # answered below, once the hits are in the page
        open_app(page, server)
        hover_cell(page, 3, (5, 2))
        page.wait_for_function("""() => [...Bokeh.documents[0].all_models].some(
            m => typeof m.text === 'string' && m.text.includes('closest to #3 (5,2)'))""")  # the hits' message came
        assert held, "the cards' module was not fetched by URL: nothing was held back"
        assert page.locator(".topk-item").count() == 0  # the component had not drawn
        for route in held:
            route.continue_()
        items = page.locator(".topk-item")
        items.nth(K - 1).wait_for()
        expect(page.get_by_role("button", name="Download top-k CSV")).to_be_enabled()
        assert (items.first.get_attribute("data-y"), items.first.get_attribute("data-x")) == ("5", "2")
        assert errors == []
    finally:
        ctx.close()
