"""The explorer in a real Chromium against a real Panel server (no mocks).

One server process and one browser serve the whole module to keep it fast. Expected overlay
values are computed here, independently of the app, from the store's vectors in float64; what
is compared is what the browser's Bokeh document holds after a real pointer move.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from browser_models import model_data
from conftest import CHROMIUM
from mosaics import tiles_from_sources

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.servers import free_port, launch, serve_explorer  # noqa: E402

pytestmark = pytest.mark.ui

S = 64
FINE, COARSE = (8, 8), (4, 4)
PAGE_SIZE, K = 8, 5

pytest.importorskip("playwright.sync_api")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from hoverlay.stores import LayerGeometry, PatchIndex, open_store
    from hoverlay.stores.synthetic import make_synthetic_store

    url = str(tmp_path_factory.mktemp("ui") / "store")
    make_synthetic_store(url, 40, layers={"fine": LayerGeometry(*FINE, 16), "coarse": LayerGeometry(*COARSE, 32)},
                         image_size=S, chunk=8, labels=("cat", "dog"))
    reader = open_store(url)  # a FAISS index for "fine" (the index path); "coarse" uses exact search
    g = reader.geometry("fine")
    vecs = reader.vectors("fine", slice(None)).reshape(-1, g.dim).astype(np.float32)
    index = PatchIndex.create(g.dim, "IDMap,Flat")
    index.train(vecs)
    index.add(vecs, np.arange(len(vecs), dtype=np.int64))
    index.meta.images_indexed = reader.n_images
    index.save(url, "fine")
    return url


@pytest.fixture(scope="module")
def reader(store):
    from hoverlay.stores import open_store

    return open_store(store)


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    server = serve_explorer([store], "--page-size", str(PAGE_SIZE), "--ncols", "4", "-k", str(K), "--tile-px", "90",
                            log_dir=tmp_path_factory.mktemp("logs"), timeout=60)
    yield server.url
    server.stop()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 1300})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    yield pg
    ctx.close()


# ----------------------------------------------------------------------------- helpers
def open_app(page, server: str, query: str = "", layer: str = "fine") -> None:
    page.goto(server + query)
    page.locator(".bk-events").first.wait_for()
    page.wait_for_function(f"""() => window.Bokeh && Bokeh.documents.length > 0
        && Bokeh.index.query_one(v => v.model.name === 'grid:{layer}') != null
        && Bokeh.documents[0].get_model_by_name('grid-rgb').data.image.length > 0""")




def overlays(page, layer: str) -> np.ndarray:
    """Per-tile maps the browser holds for a layer (n, H, W), cut out of the layer's overlay image
    at the places where the browser draws the image tiles."""
    return tiles_from_sources(model_data(page, f"grid-overlay:{layer}"), model_data(page, "grid-rgb"), layer, S)


def tile_point(page, tile: int, py: float, px: float) -> tuple[float, float]:
    """Viewport coordinates of image pixel (px, py) of a tile, from the browser's own layout."""
    return page.evaluate("""([tile, px, py]) => {
        const pv = Bokeh.index.query_one(v => v.model.name === 'grid:fine');
        const rgb = Bokeh.documents[0].get_model_by_name('grid-rgb').data;
        const x = rgb['x:fine'][tile] + px, y = rgb['y:fine'][tile] + rgb.dh[tile] - py;
        const r = pv.el.getBoundingClientRect();
        return [r.left + pv.frame.x_scale.compute(x), r.top + pv.frame.y_scale.compute(y)];
    }""", [tile, px, py])


def hover_cell(page, tile: int, cell: tuple[int, int], grid=FINE, steps: int = 5) -> None:
    """Move the pointer to the centre of cell (y, x) of a tile, waiting for the overlays to update."""
    before = page.evaluate("window.hoverlay_updates || 0")
    y, x = cell
    sx, sy = tile_point(page, tile, (y + 0.5) * S / grid[0], (x + 0.5) * S / grid[1])
    page.mouse.move(sx, sy, steps=steps)
    page.wait_for_function(f"""() => {{
        const d = Bokeh.documents[0].get_model_by_name('grid-hover').data;
        return d.tile[0] === {tile} && d.y[0] === {y} && d.x[0] === {x}
               && (window.hoverlay_updates || 0) > {before}; }}""")
    settle(page)


def wait_for_url_pin_maps(page, layer: str) -> None:
    """A URL's pin is in the pulled document; its maps are drawn once the server re-sends the
    query on load (``GridView.on_load``): wait for them, not for the pin."""
    page.wait_for_function(f"""() => Bokeh.documents[0].get_model_by_name('grid-overlay:{layer}').data.image[0]
                                         .some(v => !Number.isNaN(v))""")


def settle(page, quiet_ms: int = 250) -> None:
    """Wait until no overlay update arrived for ``quiet_ms`` (intermediate cells of a move also update)."""
    page.wait_for_function(f"""() => {{
        const n = window.hoverlay_updates || 0;
        if (window.__settle_n !== n) {{ window.__settle_n = n; window.__settle_t = performance.now(); }}
        return performance.now() - window.__settle_t > {quiet_ms};
    }}""", polling=50)


def expected_maps(reader, image: int, cell: tuple[int, int], layer: str, ids) -> np.ndarray:
    """Independent float64 cosine maps: query = the (mapped) patch's stored vector."""
    g = reader.geometry(layer)
    y, x = cell
    if (g.height, g.width) != FINE:  # mapped by receptive-field centre from the fine grid
        y = int(((y + 0.5) * S / FINE[0]) * g.height // S)
        x = int(((x + 0.5) * S / FINE[1]) * g.width // S)
    q = reader.vectors(layer, image)[y, x].astype(np.float64)
    return np.einsum("nhwd,d->nhw", reader.vectors(layer, np.asarray(ids)).astype(np.float64), q)


def page_ids(page) -> list[int]:
    return [int(t.split()[0][1:]) for t in model_data(page, "grid-labels")["text"]]


# ------------------------------------------------------------------------------- tests
def test_hover_updates_every_overlay_to_the_true_similarities(page, server, reader):
    open_app(page, server)
    ids = page_ids(page)
    assert ids == list(range(PAGE_SIZE))
    for layer in ("fine", "coarse"):  # ~10% zeros here: the vectors come without them (sparse_fp16)
        page.wait_for_function(f"() => Bokeh.documents[0].get_model_by_name('grid-vectors:{layer}').data.v[0].length > 0")
        sent = model_data(page, f"grid-vectors:{layer}")
        assert len(sent["mask"][0]["values"]) > 0 and len(sent["v"][0]["values"]) < reader.vectors(layer, ids).size
    first = None
    for tile, cell in ((2, (1, 6)), (5, (7, 0))):
        hover_cell(page, tile, cell)
        for layer in ("fine", "coarse"):
            got = overlays(page, layer)
            want = expected_maps(reader, ids[tile], cell, layer, ids)
            np.testing.assert_allclose(got, want, atol=2e-3, err_msg=f"{layer} after hovering {tile} {cell}")
        fine = overlays(page, "fine")
        assert fine[tile][cell] == pytest.approx(1.0, abs=2e-3)  # the hovered patch matches itself
        if first is None:
            first = fine
        else:
            assert not np.allclose(first, fine)  # a second patch really changed the maps
    # the hovered patch is outlined client-side, the mapped patch in the other layer too
    ptr = model_data(page, "grid-hover")
    rows = dict(zip(ptr["fig"], zip(ptr["y"], ptr["x"], ptr["w"], strict=True), strict=True))
    assert rows["fine"][:2] == (7, 0) and rows["fine"][2] == pytest.approx(S / FINE[1])
    assert rows["coarse"][2] == pytest.approx(S / COARSE[1])


def expected_function_maps(reader, store, image: int, cell: tuple[int, int], layer: str, ids,
                           function: str) -> np.ndarray:
    """Independent float64 cosine / dot / RBF maps from the stored unit vectors and norms.

    RBF's sigma is the layer's median norm (sigma scale 1) from the explorer's own statistics
    sample, the one input taken from the app: it is a display setting, not part of the maths."""
    from hoverlay.explorer.resources import compute_layer_stats

    g = reader.geometry(layer)
    y, x = cell
    if (g.height, g.width) != FINE:
        y = int(((y + 0.5) * S / FINE[0]) * g.height // S)
        x = int(((x + 0.5) * S / FINE[1]) * g.width // S)
    vecs = reader.vectors(layer, np.asarray(ids)).astype(np.float64)
    norms = reader.norms(layer, np.asarray(ids)).astype(np.float64)
    q = reader.vectors(layer, image)[y, x].astype(np.float64)
    qn = float(reader.norms(layer, image)[y, x])
    cos = np.einsum("nhwd,d->nhw", vecs, q)
    if function == "cosine":
        return cos
    if function == "dot":
        return cos * norms * qn
    sigma = compute_layer_stats(reader, layer).norm_median
    return np.exp(-np.maximum(norms ** 2 + qn ** 2 - 2 * qn * norms * cos, 0) / (2 * sigma ** 2))


@pytest.mark.parametrize("function", ["cosine", "dot", "rbf"])
def test_browser_computes_every_layer_map_for_every_function(page, server, reader, store, function):
    """The maps are the browser's own (the server sent vectors, never a map) and equal float64."""
    open_app(page, server, f"?function={function}")
    page.get_by_text("hover maps computed in this browser").first.wait_for()  # the page says which path
    ids = page_ids(page)
    for tile, cell in ((6, (0, 7)), (1, (4, 4))):
        hover_cell(page, tile, cell)
        for layer in ("fine", "coarse"):
            want = expected_function_maps(reader, store, ids[tile], cell, layer, ids, function)
            np.testing.assert_allclose(overlays(page, layer), want, atol=2e-3, rtol=2e-3,
                                       err_msg=f"{function} {layer} after hovering {tile} {cell}")
    assert page.evaluate("window.hoverlay_browser_paints") >= 2
    assert page.evaluate("window.hoverlay_kernel") == "wasm-simd"  # explorer/wasm_dot.py's kernel ran


def test_without_webassembly_the_browser_maps_come_from_its_scalar_loop(page, server, reader, store):
    """A browser without WebAssembly (or SIMD) draws the same maps with the JavaScript loop."""
    page.add_init_script("Object.defineProperty(window, 'WebAssembly', {value: undefined})")
    open_app(page, server, "?function=dot")
    page.get_by_text("hover maps computed in this browser").first.wait_for()
    ids = page_ids(page)
    hover_cell(page, 6, (0, 7))
    for layer in ("fine", "coarse"):
        want = expected_function_maps(reader, store, ids[6], (0, 7), layer, ids, "dot")
        np.testing.assert_allclose(overlays(page, layer), want, atol=2e-3, rtol=2e-3, err_msg=layer)
    assert page.evaluate("window.hoverlay_kernel") == "js"


def test_pointer_moves_send_no_websocket_frame_until_the_pointer_rests(page, server):
    sent: list[tuple[float, str]] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append((time.monotonic(), payload))))
    open_app(page, server)
    # the page's one-time messages are done: the views below the grid have joined, and the URL
    # write-back (which the browser reports) has happened
    page.wait_for_function("() => [...Bokeh.index.query(v => v.model.class_name === 'TopKCards')].length === 2"
                           " && location.search.includes('page_size=')")
    settle(page, 500)
    ptr_id = page.evaluate("Bokeh.documents[0].get_model_by_name('grid-pointer').id")
    cells = [(i % PAGE_SIZE, ((3 * i) % FINE[0], (5 * i) % FINE[1])) for i in range(50)]  # all different
    points = [tile_point(page, t, (y + 0.5) * S / FINE[0], (x + 0.5) * S / FINE[1]) for t, (y, x) in cells]
    paints = page.evaluate("window.hoverlay_browser_paints || 0")
    rest_ms = model_data(page, "grid-config")["rest"][0]
    page.evaluate("""() => { window.__moves = [];
        document.addEventListener('pointermove', () => window.__moves.push(performance.now()), {capture: true}); }""")
    sent.clear()
    for sx, sy in points:  # 50 moves, each to another patch, meant to be faster than the rest
        page.mouse.move(sx, sy)
    moves = page.evaluate("window.__moves")
    during = [p if isinstance(p, str) else p.decode("utf-8", "replace") for _, p in sent]
    assert page.evaluate("window.hoverlay_browser_paints") - paints >= 50  # every move repainted
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-pointer').data.tile.length > 0"
                           f" && Bokeh.documents[0].get_model_by_name('grid-pointer').data.tile[0] === {cells[-1][0]}")
    # A message while moving is allowed only where the pointer really rested: a gap between two
    # moves longer than the rest delay (a slow, loaded machine); then it is a rest, on the pointer.
    rests = sum(1 for a, b in zip(moves, moves[1:], strict=False) if b - a > rest_ms)
    messages = [f for f in during if '"msgtype"' in f]
    assert len(messages) <= rests, f"{len(messages)} messages while the pointer moved ({rests} rests): {during[:3]}"
    assert all(ptr_id in f for f in during if '"events"' in f)
    after = "".join(p if isinstance(p, str) else p.decode("utf-8", "replace") for _, p in sent)
    assert ptr_id in after  # the one message: the rest, on the pointer source


def test_the_tiles_on_screen_are_the_stores_images(page, server, reader):
    """Tiles travel as JPEG (explorer/jpeg.py): what the page paints is each image, in place and
    upright — the middle of every tile on a screenshot against the stored pixels there."""
    import io

    from PIL import Image as PILImage

    open_app(page, server)
    ids = page_ids(page)
    page.wait_for_timeout(300)  # the images decode after the data arrived
    shot = np.asarray(PILImage.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(np.float64)
    pixels = reader.pixels(np.asarray(ids)).astype(np.float64)
    errors, if_flipped = [], []
    for tile in range(len(ids)):
        (x0, y0), (x1, y1) = tile_point(page, tile, 0, 0), tile_point(page, tile, S, S)
        w, h = x1 - x0, y1 - y0
        for top, bottom in ((0.1, 0.45), (0.55, 0.9)):  # the upper and the lower half: upright, in place
            got = shot[round(y0 + top * h):round(y0 + bottom * h), round(x0 + 0.2 * w):round(x0 + 0.8 * w)]
            rows, cols = slice(round(top * S), round(bottom * S)), slice(round(0.2 * S), round(0.8 * S))
            errors.append(np.abs(got.mean(axis=(0, 1)) - pixels[tile, rows, cols].mean(axis=(0, 1))).max())
            if_flipped.append(np.abs(got.mean(axis=(0, 1)) - pixels[tile, ::-1][rows, cols].mean(axis=(0, 1))).max())
    assert max(errors) < 12, errors  # JPEG and the screen's resampling of sharp stripes: < 9 seen
    assert sum(errors) < 0.5 * sum(if_flipped), (errors, if_flipped)


def test_layer_view_outlines_the_mapped_patch(page, server, reader):
    open_app(page, server)
    hover_cell(page, 3, (5, 2))
    page.wait_for_function("""() => {  // the query view's figures join the page with the first query
        const m = Bokeh.documents[0].get_model_by_name('query-mapped');
        if (m == null) return false;
        const d = m.data;
        return d.fig.length === 2 && d.y[d.fig.indexOf('fine')] === 5 && d.x[d.fig.indexOf('fine')] === 2;
    }""")
    mapped = model_data(page, "query-mapped")
    by_layer = {f: (y, x, cx, cy) for f, y, x, cx, cy in
                zip(mapped["fig"], mapped["y"], mapped["x"], mapped["cx"], mapped["cy"], strict=True)}
    # fine cell (5, 2): centre (5.5, 2.5)*8 px = (44, 20) -> coarse cell (44//16, 20//16) = (2, 1)
    assert by_layer["coarse"][:2] == (2, 1)
    assert by_layer["coarse"][2:] == pytest.approx((1.5 * 16, S - 2.5 * 16))
    assert by_layer["fine"][2:] == pytest.approx((2.5 * 8, S - 5.5 * 8))
    qimg = model_data(page, "query-overlay:coarse")["image"][0]  # one tile: the mosaic is the map
    got = np.asarray(qimg["values"]).reshape(qimg["shape"])[::-1]
    np.testing.assert_allclose(got, expected_maps(reader, 3, (5, 2), "coarse", [3])[0], atol=2e-3)


def test_topk_panel_lists_k_hits_led_by_the_hovered_patch(page, server):
    open_app(page, server)
    hover_cell(page, 6, (4, 4))
    items = page.locator(".topk-item")
    items.nth(K - 1).wait_for()
    first = items.first
    deadline = time.monotonic() + 20
    while (first.get_attribute("data-image"), first.get_attribute("data-y"), first.get_attribute("data-x")) \
            != ("6", "4", "4"):
        assert time.monotonic() < deadline, "top-k never showed the hovered patch first"
        page.wait_for_timeout(100)
    assert items.count() == K
    scores = [float(items.nth(i).get_attribute("data-score")) for i in range(K)]
    assert scores[0] == pytest.approx(1.0, abs=2e-3)
    assert scores == sorted(scores, reverse=True)
    # opening a hit that is not on this page brings its image onto the page
    images = [int(items.nth(i).get_attribute("data-image")) for i in range(K)]
    heading = page.get_by_text("index + exact re-rank")  # "fine" has a FAISS index
    heading.wait_for()  # the heading and the cards come in one message; either may render first
    assert heading.count() == 1
    target = next((i for i in images if i >= PAGE_SIZE), None)
    assert target is not None, f"all hits {images} on the first page: pick another query"
    page.get_by_role("button", name=f"open #{target}").first.click()
    try:
        page.wait_for_function(f"""() => Bokeh.documents[0].get_model_by_name('grid-labels')
            .data.text.some(t => t.startsWith('#{target} '))""")
    except Exception as exc:  # CI once timed out here: say what the page shows instead
        shown = page.evaluate("Bokeh.documents[0].get_model_by_name('grid-labels').data.text")
        cards = [items.nth(i).get_attribute("data-image") for i in range(items.count())]
        raise AssertionError(f"open #{target} did not show it: labels {shown}, cards {cards}") from exc


def test_the_rested_query_keeps_drawing_after_the_pointer_left_without_being_sent_back(page, server, reader,
                                                                                     store):
    """The server does not send a rest's query back to the page that rested (it knows it): after
    the pointer left the grid, a repaint (here a new function) still draws the rested patch."""
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda p: frames.append(
        p if isinstance(p, str) else p.decode("utf-8", "replace"))))
    open_app(page, server)
    ids = page_ids(page)
    qsrc_id = page.evaluate("Bokeh.documents[0].get_model_by_name('grid-query').id")
    frames.clear()
    hover_cell(page, 3, (2, 5))
    page.locator(f".topk-item[data-image='{ids[3]}'][data-y='2'][data-x='5']").first.wait_for()
    assert not any(qsrc_id in f for f in frames), "the rest's query came back to the page"
    page.mouse.move(2, 2)  # off the grid
    page.locator("select:has(option[value='rbf'])").first.select_option("dot")
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-config').data.fn[0] === 'dot'")
    settle(page)
    for layer in ("fine", "coarse"):
        want = expected_function_maps(reader, store, ids[3], (2, 5), layer, ids, "dot")
        np.testing.assert_allclose(overlays(page, layer), want, atol=2e-3, rtol=2e-3, err_msg=layer)


#: Holds back, from the moment ``window.__gate_on`` is set, every Bokeh message whose content
#: names one of ``window.__gate_ids`` (and all messages after it, to keep their order) until
#: ``window.__gate_release()``: a page switch's later message made as late as a test needs.
MESSAGE_GATE_JS = """
(() => {
  const desc = Object.getOwnPropertyDescriptor(WebSocket.prototype, 'onmessage');
  window.__gate_on = false; window.__gate_ids = []; window.__gate_held = 0;
  Object.defineProperty(WebSocket.prototype, 'onmessage', {configurable: true,
    get() { return desc.get.call(this); },
    set(handler) {
      // a message is a header (saying how many buffers follow), metadata, content, and two
      // frames per buffer; its content says which models it changes
      let queue = [], holding = false, pending = [], count = 0, expected = 0, decided = false;
      const frame = (e) => {
        if (holding) { queue.push(e); return; }
        if (count === 0) expected = 3 + 2 * (JSON.parse(e.data).num_buffers || 0);
        count += 1;
        let now = [];
        if (decided) now = [e];
        else {
          pending.push(e);
          if (count === 3) {
            decided = true;
            if (window.__gate_on && window.__gate_ids.some(id => e.data.includes('"' + id + '"'))) {
              holding = true; window.__gate_held += 1; queue = pending;
            } else now = pending;
            pending = [];
          }
        }
        if (count === expected) { count = 0; decided = false; }
        // handed on after the counting: an error the page throws handling a message (which the
        // browser fixture reports) once left the count mid-message, and no later message was gated
        now.forEach(handler);
      };
      window.__gate_release = () => {
        window.__gate_on = false; holding = false; count = 0; decided = false;
        const q = queue; queue = []; q.forEach(frame);
      };
      desc.set.call(this, frame);
    }});
})();
"""


def test_a_page_shows_before_its_vectors_arrive_and_a_move_meanwhile_is_drawn_when_they_do(page, server, reader):
    """A page switch sends the images first and the vectors in a later message: held back here,
    the new page shows, its overlays stay empty (never the last page's maps), and a patch
    hovered meanwhile gets its maps when the vectors come, without another move. (Either slot's
    vectors message is held: which slot a page's vectors go to is the app's choice — a page sent
    ahead is in the other one, and its later message is the one naming it the shown page. When an
    earlier message threw in the page, the gate used to lose count of frames and let the vectors
    through: a timeout reports what the browser holds.)"""
    page.add_init_script(MESSAGE_GATE_JS)
    open_app(page, server)
    hover_cell(page, 2, (1, 1))
    assert np.isfinite(overlays(page, "fine")).all()
    page.evaluate("""() => { const d = Bokeh.documents[0];
        window.__gate_ids = ['grid-vectors:', 'grid-vectors-1:'].flatMap(
            slot => ['fine', 'coarse'].map(l => d.get_model_by_name(slot + l).id));
        window.__gate_on = true; }""")
    first = model_data(page, "grid-labels")["text"][0]
    page.get_by_role("button", name="next ▶").click()
    page.wait_for_function("(first) => Bokeh.documents[0].get_model_by_name('grid-labels').data.text[0] !== first",
                           arg=first)
    try:
        page.wait_for_function("() => window.__gate_held === 1")  # the vectors' message, held
    except Exception as exc:  # say what the browser holds instead
        state = page.evaluate("""() => { const d = Bokeh.documents[0], cfg = d.get_model_by_name('grid-config').data;
            return {cfg_page: cfg.page, slot: cfg.slot, held: window.__gate_held, vectors: ['grid-vectors:', 'grid-vectors-1:']
                .flatMap(s => ['fine', 'coarse'].map(l => [s + l, d.get_model_by_name(s + l).data.page[0]]))}; }""")
        raise AssertionError(f"no vectors message came after the page's: {state}") from exc
    ids = page_ids(page)
    assert ids == list(range(PAGE_SIZE, 2 * PAGE_SIZE))
    cfg = model_data(page, "grid-config")
    cfg_page, shown = cfg["page"][0], "grid-vectors-1:" if cfg["slot"][0] == 1 else "grid-vectors:"
    assert all(model_data(page, f"{shown}{layer}")["page"][0] != cfg_page for layer in ("fine", "coarse"))
    hover_cell(page, 5, (3, 6))  # the page shows and outlines the patch; no vectors to draw with yet
    for layer in ("fine", "coarse"):
        assert np.isnan(overlays(page, layer)).all(), layer
    before = page.evaluate("window.hoverlay_updates")
    page.evaluate("window.__gate_release()")
    page.wait_for_function(f"() => window.hoverlay_updates > {before}")
    settle(page)
    assert model_data(page, f"{shown}fine")["page"][0] == cfg_page
    for layer in ("fine", "coarse"):
        want = expected_maps(reader, ids[5], (3, 6), layer, ids)
        np.testing.assert_allclose(overlays(page, layer), want, atol=2e-3, err_msg=layer)


def next_page(page) -> None:
    first = model_data(page, "grid-labels")["text"][0]
    page.get_by_role("button", name="next ▶").click()
    page.wait_for_function("(first) => Bokeh.documents[0].get_model_by_name('grid-labels').data.text[0] !== first",
                           arg=first)


AHEAD_HELD = """() => { const d = Bokeh.documents[0], cfg = d.get_model_by_name('grid-config').data;
    const other = cfg.slot[0] === 1 ? 'grid-vectors:' : 'grid-vectors-1:';
    return ['fine', 'coarse'].every(l => { const v = d.get_model_by_name(other + l).data;
                                           return v.page[0] === -1 && v.v[0].length > 0; }); }"""


def test_paging_on_the_next_pages_vectors_come_ahead_and_a_switch_to_it_sends_none(page, server, reader):
    """After a session's first switch, the page after the shown one goes into the browser's other
    vectors slot; switching to it sends no vectors (the browser's arrays stay the same objects),
    the page is hoverable at once and its maps are the stored vectors' — twice, through both slots."""
    frames: list[int] = []  # sizes of the binary frames (Bokeh sends each array buffer as one)
    page.on("websocket", lambda ws: ws.on("framereceived",
                                          lambda p: frames.append(len(p)) if isinstance(p, bytes) else None))
    open_app(page, server)
    frames.clear()
    next_page(page)  # the session pages: from now on the next page comes ahead
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-vectors:fine').data.page[0]"
                           " === Bokeh.documents[0].get_model_by_name('grid-config').data.page[0]")
    sent = page.evaluate("['fine', 'coarse'].map(l => Bokeh.documents[0].get_model_by_name('grid-vectors:' + l).data.v[0].byteLength)")
    assert set(sent) <= set(frames)  # a switch to a page not sent ahead: its vectors arrive as frames of these sizes
    for k in range(2):
        page.wait_for_function(AHEAD_HELD, timeout=15_000)
        slot = model_data(page, "grid-config")["slot"][0]
        page.evaluate("""(slot) => { const d = Bokeh.documents[0];
            window.__ahead = ['fine', 'coarse'].map(l => d.get_model_by_name((slot === 1 ? 'grid-vectors:' : 'grid-vectors-1:') + l).data.v[0]); }""",
                      slot)
        ahead_sizes = set(page.evaluate("window.__ahead.map(a => a.byteLength)"))
        page.wait_for_function("""() => { const E = Bokeh.documents[0].get_model_by_name('grid-config')._hoverlay;
            return E !== undefined && window.__ahead.every(a => E.dec.has(a)); }""", timeout=10_000)  # decoded while idle
        frames.clear()
        next_page(page)
        ids = page_ids(page)
        assert ids == list(range((2 + k) * PAGE_SIZE, (3 + k) * PAGE_SIZE))
        cfg = model_data(page, "grid-config")
        assert cfg["slot"][0] == 1 - slot
        assert page.evaluate("""(slot) => { const d = Bokeh.documents[0], cfg = d.get_model_by_name('grid-config').data;
            return ['fine', 'coarse'].every((l, i) => { const v = d.get_model_by_name((slot === 1 ? 'grid-vectors-1:' : 'grid-vectors:') + l).data;
                return v.page[0] === cfg.page[0] && v.v[0] === window.__ahead[i]; }); }""", 1 - slot)
        assert not ahead_sizes & set(frames)  # the switch's messages carry no page vectors
        hover_cell(page, 3, (2, 5))
        for layer in ("fine", "coarse"):
            want = expected_maps(reader, ids[3], (2, 5), layer, ids)
            np.testing.assert_allclose(overlays(page, layer), want, atol=2e-3, err_msg=f"{layer}, switch {k}")


def test_click_pins_and_unpins_the_query(page, server, reader):
    open_app(page, server)
    hover_cell(page, 1, (2, 3))
    pinned = overlays(page, "fine")
    sx, sy = tile_point(page, 1, 2.5 * 8, 3.5 * 8)
    page.mouse.click(sx, sy)
    page.wait_for_function("() => window.location.search.includes('query=1%2C2%2C3')")
    page.wait_for_function("""() => Bokeh.documents[0].get_model_by_name('grid-pin').data.fig.length === 2""")
    # while pinned, moving to another patch changes the client-side outline but not the overlays
    sx2, sy2 = tile_point(page, 4, 0.5 * 8, 0.5 * 8)
    page.mouse.move(sx2, sy2, steps=5)
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-hover').data.tile[0] === 4")
    page.wait_for_timeout(400)
    np.testing.assert_allclose(overlays(page, "fine"), pinned)
    # a second click unpins: the overlays follow the pointer again (the clicked patch)
    page.mouse.click(sx2, sy2)
    page.wait_for_function("() => !window.location.search.includes('query=1')")
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-pin').data.fig.length === 0")
    want = expected_maps(reader, 4, (0, 0), "fine", list(range(PAGE_SIZE)))
    deadline = time.monotonic() + 10
    while not np.allclose(overlays(page, "fine"), want, atol=2e-3):
        assert time.monotonic() < deadline, "overlays did not follow the pointer after unpinning"
        page.wait_for_timeout(100)


def test_url_state_sets_layer_query_and_page(page, server, reader):
    open_app(page, server, "?layer=coarse&query=9,1,2&page=2&function=cosine")
    ids = page_ids(page)
    assert ids == list(range(PAGE_SIZE, 2 * PAGE_SIZE))
    page.wait_for_function("""() => Bokeh.documents[0].get_model_by_name('grid-pin').data.fig.length === 2""")
    wait_for_url_pin_maps(page, "coarse")
    q = reader.vectors("coarse", 9)[1, 2].astype(np.float64)
    want = np.einsum("nhwd,d->nhw", reader.vectors("coarse", np.asarray(ids)).astype(np.float64), q)
    np.testing.assert_allclose(overlays(page, "coarse"), want, atol=2e-3)


@pytest.mark.parametrize(("query", "message"), [
    ("?layer=bogus", "unknown layer 'bogus'"),
    ("?query=999,0,0", "image 999 is outside"),
    ("?query=1,8,0", "y 8 is outside"),
])
def test_bad_url_shows_a_message_and_the_app_keeps_working(page, server, reader, query, message):
    open_app(page, server, query)
    alert = page.locator(".hoverlay-message")
    alert.get_by_text(message).wait_for()
    assert alert.is_visible()
    hover_cell(page, 0, (3, 3))
    want = expected_maps(reader, 0, (3, 3), "fine", list(range(PAGE_SIZE)))
    np.testing.assert_allclose(overlays(page, "fine"), want, atol=2e-3)


XSS_PAYLOADS = ['<img src=x onerror="window.__xss=1">', "<details open ontoggle=window.__xss=1>",
                '<a href="javascript:window.__xss=1">click</a>', "<script>window.__xss=1</script>"]


@pytest.mark.parametrize("name", ["layer", "query", "function"])
@pytest.mark.parametrize("payload", XSS_PAYLOADS)
def test_url_values_are_shown_as_text_never_run(page, server, name, payload):
    """A hostile URL value is echoed in the message as the text it is; no script runs."""
    from urllib.parse import quote

    open_app(page, server, f"?{name}={quote(payload)}")
    alert = page.locator(".hoverlay-message")
    says = {"layer": "unknown layer", "query": "bad query", "function": "unknown similarity function"}[name]
    shown = alert.get_by_text(says)
    shown.wait_for()
    page.wait_for_timeout(300)  # an onerror / ontoggle handler would have fired by now
    assert page.evaluate("window.__xss") is None
    text = shown.inner_text()
    assert payload in text or payload.replace("'", "\\'") in text or name == "query", text
    assert alert.locator("img, details, a, script").count() == 0


def test_plain_panel_serve_of_the_app_module(page, store, reader, tmp_path):
    """``HOVERLAY_STORE=... panel serve explorer/app_module.py`` serves the same app."""
    port = free_port()
    plain = launch("plain", [sys.executable, "-m", "panel", "serve", "explorer/app_module.py", "--port", str(port),
                             "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}"],
                   f"http://127.0.0.1:{port}/", tmp_path, env={"HOVERLAY_STORE": store}, ready_path="app_module").wait(60)
    try:
        open_app(page, plain.url + "app_module", "?query=2,3,1")
        page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-pin').data.fig.length === 2")
        wait_for_url_pin_maps(page, "fine")
        want = expected_maps(reader, 2, (3, 1), "fine", page_ids(page))
        np.testing.assert_allclose(overlays(page, "fine"), want, atol=2e-3)
    finally:
        plain.stop()


def test_a_url_with_the_whole_view_restores_it_and_a_reload_keeps_it(page, server, reader):
    from urllib.parse import parse_qs, urlsplit

    query = ('?store=store&layers=["coarse"]&layer=fine&query=13,5,2&qlayer=fine&page=2&page_size=6'
             '&ncols=3&function=dot&range=symmetric&label=dog&order=index&seed=0&tab=0')
    whole_view = "() => ['filter', 'show', 'tab'].every(k => new URLSearchParams(location.search).has(k))"
    open_app(page, server, query)
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-pin').data.fig.length === 2")
    # the app writes the whole view back once the page reports the address it opened with; the
    # opening URL lacks 'filter' and 'show', so their arrival says the write-back has happened
    page.wait_for_function(whole_view)

    def state() -> dict:
        got = {k: v[0] for k, v in parse_qs(urlsplit(page.url).query).items()}
        shown = page.evaluate("""() => [...Bokeh.documents[0].all_models]
            .filter(m => typeof m.name === 'string' && m.name.startsWith('grid:')).map(m => m.name)""")
        return {"url": got, "figures": sorted(shown), "ids": page_ids(page)}

    first = state()
    labels = reader.table()["label"]
    dogs = [i for i in range(reader.n_images) if labels[i] == "dog"]
    assert first["ids"] == dogs[6:12]  # page 2 of 6 of the dog images
    assert first["figures"] == ["grid:coarse", "grid:fine"]  # coarse shown, fine snaps the pointer
    for key, value in (("layer", "fine"), ("query", "13,5,2"), ("page", "2"), ("page_size", "6"),
                       ("ncols", "3"), ("function", "dot"), ("range", "symmetric"), ("label", "dog")):
        assert first["url"][key] == value, key
    cfg = model_data(page, "grid-config")
    assert cfg["ncols"] == [3, 3] and cfg["fn"] == ["dot", "dot"]
    page.reload()
    open_app(page, server, "?" + urlsplit(page.url).query)
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('grid-pin').data.fig.length === 2")
    page.wait_for_function(whole_view)
    assert state() == first


def pair_maps(page, role: str, layer: str) -> np.ndarray:
    """Per-tile maps the browser holds in the two-queries view (role A, B or D = A − B)."""
    return tiles_from_sources(model_data(page, f"pair{role}-overlay:{layer}"), model_data(page, "pair-rgb"), layer, S)


def test_two_pinned_queries_show_both_maps_and_their_difference(page, server, reader):
    """Query A pinned and query B from the URL: the page shows A's and B's maps, A − B and B's top-k."""
    open_app(page, server, "?query=3,2,5&qlayer=fine&qb=6,7,1&qblayer=fine")
    page.wait_for_function("""() => {
        const d = Bokeh.documents[0].get_model_by_name('pairD-overlay:fine');
        return d !== null && d.data.image.length === 1; }""")
    page.get_by_text("Query B — ").first.wait_for()
    ids = page_ids(page)
    want_a = expected_maps(reader, 3, (2, 5), "fine", ids)
    want_b = expected_maps(reader, 6, (7, 1), "fine", ids)
    np.testing.assert_allclose(pair_maps(page, "A", "fine"), want_a, atol=2e-3)
    np.testing.assert_allclose(pair_maps(page, "B", "fine"), want_b, atol=2e-3)
    np.testing.assert_allclose(pair_maps(page, "D", "fine"), want_a - want_b, atol=4e-3)
