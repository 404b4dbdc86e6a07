"""Query with any image in a real Chromium against a real server and its real model worker (#15).

A store built by the pipeline (a two-conv model at 64 px, so the worker starts in seconds), the
server started with ``--query-worker-start``. A file goes in through the page's file input; the
overlays the browser then holds are compared with a float64 reference computed here from the
store's vectors and a direct forward pass of the same image with the store's model.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from browser_models import model_data
from conftest import CHROMIUM, write_generated_images
from mosaics import tiles_from_sources
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TESTS = str(ROOT / "tests")
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))
from bench.servers import serve_explorer  # noqa: E402

pytestmark = pytest.mark.ui
pytest.importorskip("playwright.sync_api")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)

S, PAGE = 64, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, str]:
    from hoverlay.pipeline.build import build

    root = tmp_path_factory.mktemp("upload-ui")
    images = write_generated_images(str(root / "images"), 6, seed=31, size=(96, 96))
    store = str(root / "store.zarr")
    sys.path.insert(0, TESTS)  # python:test_query:tiny_model
    build(str(root / "images"), store, model="python:test_query:tiny_model", layers=["1", "3"], size=S, quiet=True)
    query = str(root / "query.png")
    Image.open(images[3]).rotate(25).save(query)  # not in the store
    bad = str(root / "notes.png")
    Path(bad).write_bytes(b"these are notes, not pixels")
    return {"store": store, "query": query, "bad": bad}


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    server = serve_explorer([built["store"]], "--page-size", str(PAGE), "--ncols", "4", "--tile-px", "90",
                            "--query-worker-start", "--query-threads", "1",
                            log_dir=tmp_path_factory.mktemp("logs"), env={"PYTHONPATH": TESTS}, timeout=90)
    yield server.url
    server.stop()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1200})
    pg = ctx.new_page()
    yield open_page(pg, server)
    ctx.close()


def open_page(pg, server: str):
    pg.set_default_timeout(60_000)
    pg.goto(server)
    pg.wait_for_function("""() => window.Bokeh !== undefined && Bokeh.documents.length > 0
        && Bokeh.documents[0].get_model_by_name('grid-rgb') !== null
        && Bokeh.documents[0].get_model_by_name('grid-rgb').data.image.length > 0""")
    return pg


def upload(page, path: str) -> None:
    page.locator("input[type=file]").first.set_input_files(path)
    page.get_by_text("hover it to query every image of the page").wait_for()
    page.wait_for_function("""() => Bokeh.index.query_one(v => v.model.name === 'upload:1') !== null
        && Bokeh.documents[0].get_model_by_name('upload-rgb').data.image.length === 1""")


def overlays(page, layer: str) -> np.ndarray:
    """Per-tile maps the browser holds for a layer of the main grid (n, H, W)."""
    return tiles_from_sources(model_data(page, f"grid-overlay:{layer}"), model_data(page, "grid-rgb"), layer, S)


def upload_point(page, py: float, px: float) -> tuple[float, float]:
    """Viewport coordinates of pixel (px, py) of the query tile (figure ``upload:1``)."""
    return page.evaluate("""([px, py]) => {
        const pv = Bokeh.index.query_one(v => v.model.name === 'upload:1');
        const rgb = Bokeh.documents[0].get_model_by_name('upload-rgb').data;
        const x = rgb['x:1'][0] + px, y = rgb['y:1'][0] + rgb.dh[0] - py;
        const r = pv.el.getBoundingClientRect();
        return [r.left + pv.frame.x_scale.compute(x), r.top + pv.frame.y_scale.compute(y)];
    }""", [px, py])


def test_an_uploaded_image_queries_the_page_and_the_store(page, built):
    from hoverlay.pipeline.query import embed_image, load_store_model
    from hoverlay.stores import open_store

    upload(page, built["query"])
    before = model_data(page, "grid-overlay:1")["image"][0]["values"]
    y, x = 9, 6  # a cell of layer "1" (16x16): the pointer snaps to it on the query tile
    sx, sy = upload_point(page, (y + 0.5) * S / 16, (x + 0.5) * S / 16)
    page.mouse.move(sx, sy, steps=4)
    page.wait_for_function("""() => {
        const d = Bokeh.documents[0].get_model_by_name('upload-pointer').data;
        return d.tile[0] === 0 && d.y[0] === Y && d.x[0] === X; }""".replace("Y", str(y)).replace("X", str(x)))
    page.get_by_text("patches of the store closest to the upload query.png").wait_for()
    reader = open_store(built["store"])
    ids = list(range(PAGE))
    emb = embed_image(Path(built["query"]).read_bytes(), load_store_model(built["store"]))
    for layer, (h, w) in (("1", (16, 16)), ("3", (8, 8))):
        yi, xi = min(h - 1, int((y + 0.5) * h / 16)), min(w - 1, int((x + 0.5) * w / 16))
        q = emb.layers[layer].vectors[yi, xi].astype(np.float64)
        want = np.einsum("nhwd,d->nhw", reader.vectors(layer, ids).astype(np.float64), q) / np.linalg.norm(q)
        np.testing.assert_allclose(overlays(page, layer), want, atol=2e-3, err_msg=layer)
    assert model_data(page, "grid-overlay:1")["image"][0]["values"] != before
    cards = page.locator(".topk-item")
    assert cards.count() >= 1


def test_a_bad_upload_says_why_and_the_page_keeps_working(page, built):
    page.locator("input[type=file]").first.set_input_files(built["bad"])
    page.get_by_text("is not an image Pillow can read").wait_for()
    assert model_data(page, "grid-rgb")["image"]  # the page is still there
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    page.locator("input[type=file]").first.set_input_files(
        files=[{"name": "half.png", "mimeType": "image/png", "buffer": buf.getvalue()[:60]}])
    page.get_by_text("truncated or corrupt").wait_for()


def test_hovering_the_query_tile_draws_the_page_in_the_browser_with_no_message(browser, server, built):
    """The grid's page is on the browser path, so the query tile holds the upload's vectors: each
    move across it repaints the tile and every page tile at once, and the only message is the
    rest. What the browser drew is the float64 similarity to the upload's own vector."""
    from hoverlay.pipeline.query import embed_image, load_store_model
    from hoverlay.stores import open_store

    sent: list[str] = []
    ctx = browser.new_context(viewport={"width": 1600, "height": 1200})
    pg = ctx.new_page()
    pg.on("websocket", lambda ws: ws.on("framesent", lambda p: sent.append(
        p if isinstance(p, str) else p.decode("utf-8", "replace"))))
    page = open_page(pg, server)
    try:
        upload(page, built["query"])
        page.get_by_text("hover maps computed in this browser").wait_for()
        ptr_id = page.evaluate("Bokeh.documents[0].get_model_by_name('upload-pointer').id")
        rest_ms = model_data(page, "upload-config")["rest"][0]
        cells = [((3 * i + 1) % 16, (5 * i + 2) % 16) for i in range(12)]  # all different
        points = [upload_point(page, (y + 0.5) * S / 16, (x + 0.5) * S / 16) for y, x in cells]
        page.evaluate("""() => { window.__moves = []; window.__grid_paints = [];
            document.addEventListener('pointermove', () => window.__moves.push(performance.now()), {capture: true});
            Bokeh.documents[0].get_model_by_name('grid-overlay:1').change.connect(
                () => window.__grid_paints.push(performance.now())); }""")
        time.sleep(0.3)
        sent.clear()
        for sx, sy in points:
            page.mouse.move(sx, sy)
        moves = page.evaluate("window.__moves")
        during = list(sent)
        grid_paints = page.evaluate("window.__grid_paints.length")
        page.wait_for_function("""() => { const d = Bokeh.documents[0].get_model_by_name('upload-pointer').data;
            return d.tile.length > 0 && d.y[0] === Y && d.x[0] === X; }"""
                               .replace("Y", str(cells[-1][0])).replace("X", str(cells[-1][1])))
        assert grid_paints >= len(cells), f"the grid repainted {grid_paints} times for {len(cells)} moves"
        rests = sum(1 for a, b in zip(moves, moves[1:], strict=False) if b - a > rest_ms)
        messages = [f for f in during if '"msgtype"' in f]
        assert len(messages) <= rests, f"{len(messages)} messages while the pointer moved ({rests} rests): {during[:4]}"
        assert ptr_id in "".join(sent)  # the rest, on the query tile's pointer
        # the last move's maps, drawn in the browser: the page's and the tile's own
        reader = open_store(built["store"])
        emb = embed_image(Path(built["query"]).read_bytes(), load_store_model(built["store"]))
        y, x = cells[-1]
        q = emb.layers["1"].vectors[y, x].astype(np.float64)
        q /= np.linalg.norm(q)
        want = np.einsum("nhwd,d->nhw", reader.vectors("1", list(range(PAGE))).astype(np.float64), q)
        np.testing.assert_allclose(overlays(page, "1"), want, atol=2e-3)
        own = tiles_from_sources(model_data(page, "upload-overlay:1"), model_data(page, "upload-rgb"), "1", S)[0]
        assert own[y, x] == pytest.approx(1.0, abs=2e-3)
        np.testing.assert_allclose(own, emb.layers["1"].vectors.astype(np.float64) @ q, atol=2e-3)
    finally:
        ctx.close()


def test_a_second_upload_hovered_at_the_same_cell_gets_its_own_top_k(page, built, tmp_path):
    """The rest after a new upload writes the same pointer cell as the one before it: the page
    must still tell the server (it dropped a write equal to the source's data, so the top-k of
    the second upload never came)."""
    second = tmp_path / "second.png"
    Image.open(built["query"]).rotate(10).save(second)
    y, x = 7, 8
    for path in (built["query"], str(second)):
        upload(page, path)
        page.get_by_text(f"{Path(path).name}: hover it").wait_for()
        page.mouse.move(1, 1)
        sx, sy = upload_point(page, (y + 0.5) * S / 16, (x + 0.5) * S / 16)
        page.mouse.move(sx, sy)
        page.get_by_text(f"patches of the store closest to the upload {Path(path).name}").wait_for(timeout=20_000)
