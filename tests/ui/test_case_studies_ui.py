"""The case-study views in a real Chromium against a real Panel server, on stores the real pipeline built.

Two stores from the same two generated images: GoogLeNet (random weights, ``inception4d``,
14×14) with rotated / rescaled copies and NMF groups (k=4) of its first six images, and
ResNet-18 (random weights, ``layer2``, 28×28) without copies. One server serves both (the
"Compare models" tab appears by itself: the stores share the images' content hashes).

Expected numbers are computed here from the stores with ``stores`` functions and numpy, never
with the explorer's own helpers; what is compared is what the browser's Bokeh document holds
after a real pointer move. Set ``HOVERLAY_SCREENSHOTS=DIR`` to keep a screenshot of each view.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from browser_models import ensure_live, model_data
from conftest import CHROMIUM

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.servers import serve_explorer  # noqa: E402

pytestmark = pytest.mark.ui

LAYER_A, LAYER_B = "inception4d", "layer2"
PAGE_SIZE, NCOLS = 8, 4
FACTORIZED = list(range(6))
SHOTS = os.environ.get("HOVERLAY_SCREENSHOTS")

pytest.importorskip("playwright.sync_api")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> tuple[str, str]:
    from conftest import write_generated_images

    from hoverlay.pipeline.build import build
    from hoverlay.pipeline.factorize import factorize

    root = tmp_path_factory.mktemp("case_studies")
    images = str(root / "images")
    write_generated_images(images, 2, seed=3)
    a, b = str(root / "googlenet.zarr"), str(root / "resnet18.zarr")
    build(images, a, model="torchvision:googlenet", weights="none", layers=[LAYER_A], quiet=True, index=False,
          rotate="0:360:30", scale="0.5:1.0:0.1")
    factorize(a, LAYER_A, k=4, images=FACTORIZED, quiet=True)
    build(images, b, model="torchvision:resnet18", weights="none", layers=[LAYER_B], quiet=True, index=False)
    return a, b


@pytest.fixture(scope="module")
def readers(stores):
    from hoverlay.stores import open_store

    return tuple(open_store(s) for s in stores)


@pytest.fixture(scope="module")
def server(stores, tmp_path_factory):
    server = serve_explorer(list(stores), "--page-size", str(PAGE_SIZE), "--ncols", str(NCOLS), "--tile-px", "90",
                            "--no-live-topk", log_dir=tmp_path_factory.mktemp("logs"), timeout=60)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def page(browser, server):
    """One session for the module (a session start is seconds here); each test opens its tab."""
    ctx = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    pg.goto(server)
    pg.wait_for_function(f"""() => window.Bokeh && Bokeh.documents.length > 0
        && Bokeh.index.query_one(v => v.model.name === 'grid:{LAYER_A}') != null
        && Bokeh.documents[0].get_model_by_name('grid-rgb').data.image.length > 0""")
    yield pg
    ctx.close()


# ----------------------------------------------------------------------------- helpers


def open_tab(page, title: str, figure: str) -> None:
    """Open a tab and wait until its figure is laid out and has stayed where it is for 300 ms: the
    tab's other parts (a chart, a heading) may still arrive and move it (a point computed before
    that missed the tiles: CI, once)."""
    page.locator(".bk-tab", has_text=title).click()
    page.wait_for_function(f"""() => {{
        const v = Bokeh.index.query_one(v => v.model.name === '{figure}' && v.el.isConnected);
        if (v == null) return false;
        const r = v.el.getBoundingClientRect(), at = [r.left, r.top, r.width, r.height].join();
        if (r.width === 0) return false;
        if (window.__tab_at !== at) {{ window.__tab_at = at; window.__tab_t = performance.now(); }}
        return performance.now() - window.__tab_t > 300; }}""", polling=50)


def tile_point(page, figure: str, rgb: str, key: str, tile: int, py: float, px: float) -> tuple[float, float]:
    """Viewport coordinates of image pixel (px, py) of a tile, from the browser's own layout."""
    ensure_live(page)
    return page.evaluate("""([figure, rgb, key, tile, px, py]) => {
        const pv = Bokeh.index.query_one(v => v.model.name === figure && v.el.isConnected);
        const d = window.hoverlay_live(rgb).data;
        const x = d['x:' + key][tile] + px, y = d['y:' + key][tile] + d.dh[tile] - py;
        const r = pv.el.getBoundingClientRect();
        return [r.left + pv.frame.x_scale.compute(x), r.top + pv.frame.y_scale.compute(y)];
    }""", [figure, rgb, key, tile, px, py])


def move_and_wait(page, xy: tuple[float, float], sources: list[str]) -> None:
    """Move the pointer, then wait until every named overlay source changed after the move and
    nothing changed for 300 ms (intermediate cells of the move also update)."""
    page.evaluate("window.__t0 = performance.now()")
    page.mouse.move(*xy, steps=4)
    names = repr(sources)
    page.wait_for_function(f"""() => {names}.every(n => ((window.hoverlay_update_times || {{}})[n] || 0) > window.__t0)""")
    page.wait_for_function("""() => {
        const n = window.hoverlay_updates || 0;
        if (window.__settle_n !== n) { window.__settle_n = n; window.__settle_t = performance.now(); }
        return performance.now() - window.__settle_t > 300; }""", polling=50)


def tiles(page, overlay: str, rgb: str, key: str, size: int) -> np.ndarray:
    """Per-tile arrays (n, H, W) cut out of a figure's mosaic where the browser draws the tiles."""
    data = model_data(page, overlay)
    pos = page.evaluate("""([rgb, key]) => {  // only the positions: the images are large
        const d = window.hoverlay_live(rgb).data;
        return {x: Array.from(d['x:' + key]), y: Array.from(d['y:' + key])}; }""", [rgb, key])
    img = data["image"][0]
    mosaic = np.asarray(img["values"]).reshape(img["shape"])[::-1]  # Bokeh row 0: bottom
    rows, cols = mosaic.shape
    cell_w, cell_h = data["dw"][0] / cols, data["dh"][0] / rows
    h, w = round(size / cell_h), round(size / cell_w)
    out = []
    for x0, y0 in zip(pos["x"], pos["y"], strict=True):
        c0, r0 = round(x0 / cell_w), round((data["dh"][0] - y0 - size) / cell_h)
        out.append(mosaic[r0:r0 + h, c0:c0 + w])
    return np.stack(out)


def cosines(reader, layer: str, image: int, cell: tuple[int, int], ids) -> np.ndarray:
    q = reader.vectors(layer, image)[cell].astype(np.float64)
    return np.einsum("nhwd,d->nhw", reader.vectors(layer, np.asarray(ids)).astype(np.float64), q)


def shot(page, name: str) -> None:
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


# ------------------------------------------------------------------------------- tests
def test_sweep_chart_follows_the_hovered_patch(page, readers):
    from hoverlay.stores.transforms import copies_of, map_patch, sweep_similarity

    reader = readers[0]
    table = reader.table()
    g = reader.geometry(LAYER_A)
    s = reader.image_size
    open_tab(page, "Transform sweep", f"sweep:{LAYER_A}")
    copies = copies_of(table["base_id"], 0)
    base = reader.vectors(LAYER_A, 0)
    for target in ((7, 3), (1, 1)):
        xy = tile_point(page, f"sweep:{LAYER_A}", "sweep-rgb", LAYER_A, 0, (target[0] + 0.5) * s / g.height,
                        (target[1] + 0.5) * s / g.width)
        move_and_wait(page, xy, [f"sweep-overlay:{LAYER_A}"])
        # the pointer lands in the intended cell or, when the page layout shifts by a few
        # pixels, a neighbour; the chart must then follow the cell actually hovered
        ptr = model_data(page, "sweep-pointer")
        assert ptr["tile"][0] == 0
        cell = (int(ptr["y"][0]), int(ptr["x"][0]))
        assert abs(cell[0] - target[0]) <= 1 and abs(cell[1] - target[1]) <= 1, (cell, target)
        direct = sweep_similarity(base, [reader.vectors(LAYER_A, int(i)) for i in copies],
                                  table["transform"][copies], table["param"][copies], *cell)
        for kind, identity in (("rotate", 0.0), ("scale", 1.0)):
            mine = table["transform"][copies] == kind
            want = {identity: float(base[cell].astype(np.float32) @ base[cell].astype(np.float32))}
            want.update(zip(table["param"][copies][mine].astype(np.float64).tolist(), direct[mine].tolist(),
                            strict=True))

            def check_curve(kind: str = kind, want: dict = want, cell: tuple = cell) -> None:
                curve = model_data(page, f"sweep-curve:{kind}")
                got = dict(zip(curve["param"], curve[LAYER_A], strict=True))
                assert sorted(got) == pytest.approx(sorted(want))
                for p, value in zip(sorted(got), [want[p] for p in sorted(want)], strict=True):
                    if np.isnan(value):
                        assert got[p] is None or np.isnan(got[p]), f"{kind} {p}: patch left the canvas"
                    else:
                        assert got[p] == pytest.approx(value, abs=1e-5), f"{kind} {p} at {cell}"

            # the chart's data comes in its own update, after the overlays on a loaded machine
            deadline = time.monotonic() + 10
            while True:
                try:
                    check_curve()
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    page.wait_for_timeout(100)
        # the corresponding patch is outlined on every copy it stays on
        mapped = model_data(page, "sweep-mapped")
        outlined = {t: (y, x) for t, y, x in zip(mapped["tile"], mapped["y"], mapped["x"], strict=True)}
        expected = {t: map_patch(*cell, g.height, g.width, str(table["transform"][i]), float(table["param"][i]))
                    for t, i in enumerate(copies, start=1)}
        assert outlined == {t: c for t, c in expected.items() if c is not None}
        if target == (1, 1):
            assert any(c is None for c in expected.values())  # zooming in pushes the corner off
    shot(page, "sweep")


def test_groups_overlay_colours_patches_by_group_and_hover_keeps_similarity(page, readers):
    from hoverlay.explorer.groups_view import (
        GROUP_PALETTE,  # the fixed palette is the specification
    )
    from hoverlay.stores.groups import read_groups

    reader = readers[0]
    s = reader.image_size
    open_tab(page, "Explorer", f"grid:{LAYER_A}")
    page.get_by_role("button", name="groups", exact=True).click()
    page.wait_for_function(f"""() => Bokeh.documents[0].get_model_by_name('grid-groups:{LAYER_A}')
        .data.image[0].shape[0] > 1""")
    got = tiles(page, f"grid-groups:{LAYER_A}", "grid-rgb", LAYER_A, s).astype(np.uint32)
    stored, meta = read_groups(reader, LAYER_A, np.arange(PAGE_SIZE))
    assert meta["k"] == 4
    rgba = got.view(np.uint8).reshape(*got.shape, 4)
    for i in range(PAGE_SIZE):
        for y, x in ((0, 0), (7, 3), (13, 13), (5, 9)):
            group = int(stored[i, y, x])
            if i in FACTORIZED:
                c = GROUP_PALETTE[group % len(GROUP_PALETTE)].lstrip("#")
                assert rgba[i, y, x].tolist() == [int(c[j:j + 2], 16) for j in (0, 2, 4)] + [255], (i, y, x)
            else:
                assert group == -1 and rgba[i, y, x, 3] == 0  # not factorised: transparent
    assert len({int(v) for v in got[: len(FACTORIZED)].ravel()}) > 1  # more than one group on the page
    legend = page.locator(".group-legend-item")
    legend.nth(3).wait_for()
    assert legend.count() == 4
    assert [legend.nth(i).get_attribute("data-color") for i in range(4)] == list(GROUP_PALETTE[:4])
    assert page.locator(".group-patch").count() == 16
    shot(page, "groups")
    # groups + similarity: group outlines over the similarity fill, which follows the pointer
    page.get_by_role("button", name="groups + similarity", exact=True).click()
    g = reader.geometry(LAYER_A)
    xy = tile_point(page, f"grid:{LAYER_A}", "grid-rgb", LAYER_A, 2, 5.5 * s / g.height, 8.5 * s / g.width)
    move_and_wait(page, xy, [f"grid-overlay:{LAYER_A}"])
    want = cosines(reader, LAYER_A, 2, (5, 8), range(PAGE_SIZE))
    np.testing.assert_allclose(tiles(page, f"grid-overlay:{LAYER_A}", "grid-rgb", LAYER_A, s), want, atol=2e-3)
    shot(page, "groups-similarity")


def test_compare_view_updates_both_stores_on_one_hover(page, readers):
    ra, rb = readers
    sa, sb = ra.image_size, rb.image_size
    ga, gb = ra.geometry(LAYER_A), rb.geometry(LAYER_B)
    open_tab(page, "Compare models", "compare:A")
    ids_a = [int(t.split()[0][1:]) for t in model_data(page, "compare-A-labels")["text"]]
    ids_b = [int(t.split()[0][1:]) for t in model_data(page, "compare-B-labels")["text"]]
    assert len(ids_a) == len(ids_b) == 2
    for i, j in zip(ids_a, ids_b, strict=True):  # paired by content, not by id
        assert ra.table()["hash"][i] == rb.table()["hash"][j]
        np.testing.assert_array_equal(ra.pixels(i), rb.pixels(j))
    for figure, key, size, tile, (py, px) in (("compare:A", "A", sa, 1, (150.0, 60.0)),
                                               ("compare:B", "B", sb, 0, (30.0, 200.0))):
        xy = tile_point(page, figure, f"compare-{key}-rgb", key, tile, py, px)
        move_and_wait(page, xy, ["compare-overlay:A", "compare-overlay:B"])
        ptr = model_data(page, "compare-pointer")
        v, u = ptr["v"][0], ptr["u"][0]
        assert ptr["tile"][0] == tile and (v * size, u * size) == pytest.approx((py, px), abs=2.0)
        for reader, layer, g, ids, k in ((ra, LAYER_A, ga, ids_a, "A"), (rb, LAYER_B, gb, ids_b, "B")):
            cell = (min(g.height - 1, int(np.floor(v * g.height))), min(g.width - 1, int(np.floor(u * g.width))))
            row = ptr["fig"].index(k)
            assert (ptr["y"][row], ptr["x"][row]) == cell  # the outline the browser draws
            got = tiles(page, f"compare-overlay:{k}", f"compare-{k}-rgb", k, reader.image_size)
            np.testing.assert_allclose(got, cosines(reader, layer, ids[tile], cell, ids), atol=2e-3,
                                       err_msg=f"store {k} after hovering {figure}")
    shot(page, "compare")


def set_widget(page, title: str, value) -> None:
    """Change a sidebar widget's value in the browser, as a user's edit does (it syncs to the server)."""
    page.evaluate("""([title, value]) => {
        const m = [...Bokeh.documents[0].all_models].find(m => m.title === title && 'value' in m);
        m.value = value; }""", [title, value])


def test_layout_changes_on_a_page_with_groups_keep_the_grid_and_the_hover(page, readers, browser, server):
    """Today's main: on a sweep store with NMF groups served beside another store, changing Columns
    or Page size blanked the grid ('reference pNNNN isn't known' in the console) until a reload."""
    ctx = browser.new_context(viewport={"width": 1600, "height": 1100})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        pg.goto(server)
        figure = f"grid:{LAYER_A}"
        pg.wait_for_function(f"""() => window.Bokeh && Bokeh.documents.length > 0
            && Bokeh.index.query_one(v => v.model.name === '{figure}') != null""")
        reader = readers[0]
        s, g = reader.image_size, reader.geometry(LAYER_A)
        for step, (title, value, n_tiles) in enumerate((("Columns", 2, PAGE_SIZE), ("Page size", 6, 6),
                                                        ("Tile px", 70, 6), ("Columns", 3, 6))):
            ensure_live(pg)
            before = pg.evaluate("() => window.hoverlay_live('grid-rgb').id")
            set_widget(pg, title, value)
            pg.wait_for_function(f"""([n, before]) => {{  // the rebuilt figure, shown, with its images
                const v = Bokeh.index.query_one(v => v.model.name === '{figure}' && v.el.isConnected);
                const rgb = window.hoverlay_live('grid-rgb');
                return v != null && v.el.getBoundingClientRect().width > 0
                       && rgb != null && rgb.id !== before && rgb.data.image.length === n; }}""",
                                 arg=[n_tiles, before])
            tile, cell = step % n_tiles, (step + 2, 10 - step)
            xy = tile_point(pg, figure, "grid-rgb", LAYER_A, tile, (cell[0] + 0.5) * s / g.height,
                            (cell[1] + 0.5) * s / g.width)
            move_and_wait(pg, xy, [f"grid-overlay:{LAYER_A}"])
            got = tiles(pg, f"grid-overlay:{LAYER_A}", "grid-rgb", LAYER_A, s)
            want = cosines(reader, LAYER_A, tile, cell, range(n_tiles))  # index order: tile t is image t
            np.testing.assert_allclose(got, want, atol=2e-3, err_msg=f"after {title}={value}")
        assert not [e for e in errors if "isn't known" in e or "reference" in e], errors
        # the groups switch still works on the rebuilt figures
        pg.get_by_role("button", name="groups", exact=True).click()
        pg.wait_for_function(f"""() => window.hoverlay_live('grid-groups:{LAYER_A}')
            .data.image[0].shape[0] > 1""")
        assert not [e for e in errors if "isn't known" in e], errors
    finally:
        ctx.close()


def test_switching_store_to_one_with_other_layers_shows_its_layers_and_hovers(browser, server, readers):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1100})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    try:
        pg.goto(server)
        pg.wait_for_function(f"""() => window.Bokeh && Bokeh.documents.length > 0
            && Bokeh.index.query_one(v => v.model.name === 'grid:{LAYER_A}') != null""")
        store_b = [m for m in pg.evaluate("""() => [...Bokeh.documents[0].all_models]
            .filter(m => m.title === 'Store').map(m => m.options)""")[0] if "resnet18" in str(m)][0]
        set_widget(pg, "Store", store_b if isinstance(store_b, str) else store_b[0])
        figure = f"grid:{LAYER_B}"
        pg.wait_for_function(f"""() => {{
            const v = Bokeh.index.query_one(v => v.model.name === '{figure}');
            return v != null && v.el.isConnected && v.el.getBoundingClientRect().width > 0; }}""")
        pg.get_by_text("this store has other layers").first.wait_for()
        shown = pg.evaluate("""() => [...Bokeh.documents[0].all_models]
            .find(m => m.title === 'Layers shown').value""")
        assert shown == [LAYER_B]
        reader = readers[1]
        s, g = reader.image_size, reader.geometry(LAYER_B)
        xy = tile_point(pg, figure, "grid-rgb", LAYER_B, 1, 2.5 * s / g.height, 3.5 * s / g.width)
        move_and_wait(pg, xy, [f"grid-overlay:{LAYER_B}"])
        got = tiles(pg, f"grid-overlay:{LAYER_B}", "grid-rgb", LAYER_B, s)
        np.testing.assert_allclose(got, cosines(reader, LAYER_B, 1, (2, 3), range(reader.n_images)), atol=2e-3)
    finally:
        ctx.close()
