"""The explorer's case-study views without a browser: transform sweeps, NMF groups, comparing models.

Pure functions are checked against independent numpy (or brute force); the views are driven
through their Bokeh sources, the way the browser drives them, in an app without a server.
The browser tests (tests/ui/test_case_studies_ui.py) prove the same numbers reach Chromium.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from hoverlay.explorer.compare import pair_by_hash, pointer_location, relative_cell
from hoverlay.explorer.groups_view import (
    GROUP_PALETTE,
    group_colors,
    group_palette_index,
    hex_rgba,
    outline_cells,
    top_group_patches,
)
from hoverlay.explorer.sweep import bases_with_copies, copy_cells, sweep_chart, sweep_set
from hoverlay.stores import LayerGeometry, create_store, open_store
from hoverlay.stores.synthetic import clustered_activations, make_synthetic_store, synthetic_pixels
from hoverlay.stores.transforms import map_patch, sweep_similarity

S = 32
LAYERS = {"fine": LayerGeometry(8, 8, 16), "coarse": LayerGeometry(4, 4, 8)}
# image 0: base with 3 rotations + 2 scales; 6: plain; 7: base with one rotation; 9: failed copy of 0
ROWS = [
    {"hash": "h0"}, {"hash": "h0|r90", "base_id": 0, "transform": "rotate", "param": 90},
    {"hash": "h0|r270", "base_id": 0, "transform": "rotate", "param": 270},
    {"hash": "h0|s.5", "base_id": 0, "transform": "scale", "param": 0.5},
    {"hash": "h0|r180", "base_id": 0, "transform": "rotate", "param": 180},
    {"hash": "h0|s.75", "base_id": 0, "transform": "scale", "param": 0.75},
    {"hash": "h6"}, {"hash": "h7"}, {"hash": "h7|r45", "base_id": 7, "transform": "rotate", "param": 45},
    {"hash": "h0|r30", "base_id": 0, "transform": "rotate", "param": 30, "status": "failed", "reason": "x"},
]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("sweep") / "store")
    writer = create_store(url, model={"spec": "test"}, preprocessing={"kind": "test"}, image_size=S,
                          layers=LAYERS, chunk=4)
    rng = np.random.default_rng(1)
    n = len(ROWS)
    start = writer.reserve(n)
    writer.write_block(start, synthetic_pixels(rng, n, S),
                       {name: clustered_activations(rng, (n, g.height, g.width, g.dim)) for name, g in LAYERS.items()})
    writer.write_table(start, [{"label": "l", **row} for row in ROWS])
    writer.commit(n)
    return url


# ------------------------------------------------------------------------------------ sweeps
def test_sweep_sets_order_copies_and_skip_failed(sweep_store):
    table = open_store(sweep_store).table()
    assert bases_with_copies(table).tolist() == [0, 7]
    s = sweep_set(table, 0)
    assert s.ids.tolist() == [0, 1, 4, 2, 3, 5]  # rotations by angle, then scales; failed 9 left out
    assert s.kinds == ("rotate", "rotate", "rotate", "scale", "scale")
    assert s.params == pytest.approx((90, 180, 270, 0.5, 0.75))
    assert [s.caption(t) for t in (0, 1, 4)] == ["base #0", "↻ 90°", "zoom ×0.5"]
    assert copy_cells(s, 0, 0, (8, 8))[:3] == [(7, 0), (7, 7), (0, 7)]  # a corner goes round
    assert copy_cells(s, 0, 0, (8, 8))[3] is None  # zooming in x2 pushes the corner off


def test_sweep_chart_equals_sweep_similarity_of_the_stored_vectors(sweep_store):
    reader = open_store(sweep_store)
    table = reader.table()
    s = sweep_set(table, 0)
    cells = {"fine": (5, 2), "coarse": (2, 1)}
    chart = sweep_chart({name: reader.vectors(name, s.ids) for name in LAYERS}, s, cells)
    for name, (y, x) in cells.items():
        base = reader.vectors(name, 0)
        for kind, identity in (("rotate", 0.0), ("scale", 1.0)):
            ids = np.array([i for i in s.copies if table["transform"][i] == kind])
            direct = sweep_similarity(base, [reader.vectors(name, int(i)) for i in ids], [kind] * len(ids),
                                      table["param"][ids], y, x)
            params = table["param"][ids].astype(np.float64)
            want = dict(zip([identity, *params], [float(base[y, x].astype(np.float32) @ base[y, x]), *direct],
                            strict=True))
            got = chart[kind]
            assert got["param"].tolist() == sorted(want)
            np.testing.assert_allclose(got[name], [want[p] for p in sorted(want)], rtol=0, atol=1e-6)
            assert np.isnan(got[name]).tolist() == np.isnan([want[p] for p in sorted(want)]).tolist()
    assert chart["rotate"]["fine"][0] == pytest.approx(1.0, abs=2e-3)  # the base with itself


def test_sweep_view_hover_sends_chart_overlays_and_copy_outlines(sweep_store):
    from hoverlay.explorer.app import create_app

    app = create_app(sweep_store, layer="fine").app
    view = app.sweep_view
    assert view is not None and not view.built and view.figures == []  # built when its tab is shown
    app.tabs.active = 1
    assert view.built and view.sweep.base == 0 and [f.layer for f in view.figures] == ["fine", "coarse"]
    for bad in ({"tile": [1], "y": [0], "x": [0]}, {"tile": [0], "y": [8], "x": [0]}, {"tile": ["a"], "y": [0]}):
        view._on_pointer("data", None, bad)  # client input no page writes: dropped
    assert view.cell is None and len(view.curves["rotate"].data["param"]) == 0
    view.shared.pointer.data = {"fig": ["fine"], "tile": [0], "y": [6], "x": [1], "cx": [0], "cy": [0],
                                "w": [0], "h": [0], "click": [0]}
    reader = open_store(sweep_store)
    s = view.sweep
    want = sweep_chart({n: reader.vectors(n, s.ids) for n in LAYERS}, s, {"fine": (6, 1), "coarse": (3, 0)})
    for kind in ("rotate", "scale"):
        for col, values in want[kind].items():
            np.testing.assert_allclose(view.curves[kind].data[col], values, atol=1e-6, err_msg=f"{kind} {col}")
    rows = view.mapped.data
    fine = {t: (y, x) for f, t, y, x in zip(rows["fig"], rows["tile"], rows["y"], rows["x"], strict=True)
            if f == "fine"}
    expected = {t: map_patch(6, 1, 8, 8, k, p) for t, (k, p) in enumerate(zip(s.kinds, s.params, strict=True), 1)}
    assert fine == {t: c for t, c in expected.items() if c is not None}
    # every tile's overlay is its similarity to the hovered base patch
    q = reader.vectors("fine", 0)[6, 1].astype(np.float64)
    maps = np.einsum("nhwd,d->nhw", reader.vectors("fine", s.ids).astype(np.float64), q)
    mosaic = view.figures[0].source.data["image"][0]
    assert np.nanmax(mosaic) == pytest.approx(maps.max(), abs=1e-5)


def test_sweep_tab_only_for_stores_with_copies(sweep_store, tmp_path):
    from hoverlay.explorer.app import create_app

    plain = str(tmp_path / "plain")
    make_synthetic_store(plain, 4, layers=LAYERS, image_size=S, chunk=4)
    assert create_app(plain).app.sweep_view is None
    app = create_app(sweep_store).app
    assert list(app.tabs._names) == ["Explorer", "Transform sweep"]


def test_every_page_kind_passes_bokehs_integrity_check(sweep_store, tmp_path):
    """Served sessions skip Bokeh's per-document check (``explorer.serve.skip_session_validation``):
    here it runs on the page kinds — one store, the sweep store with its tab shown, two stores."""
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    from hoverlay.explorer.app import create_app
    from hoverlay.explorer.serve import document_errors

    plain = str(tmp_path / "plain")
    make_synthetic_store(plain, 6, layers={"other": LayerGeometry(4, 4, 8)}, image_size=S, chunk=4)
    for stores in ([plain], [sweep_store], [sweep_store, plain]):
        doc = Document()
        with set_curdoc(doc):
            layout = create_app(stores)
            doc.add_root(layout.get_root(doc))
            if layout.app.tabs is not None:
                layout.app.tabs.active = 1
        assert document_errors(doc) == [], stores


# ------------------------------------------------------------------------------------ groups
def test_group_palette_index_and_colours():
    groups = np.array([[0, 1, -1], [2, 21, 3]], dtype=np.int16)
    idx = group_palette_index(groups)
    assert idx.tolist() == [[0, 1, -1], [2, 1, 3]]  # 21 wraps onto 1 (20 fixed colours)
    assert group_palette_index(np.array([np.nan, 4.0])).tolist() == [-1, 4]
    rgba = group_colors(groups).view(np.uint8).reshape(2, 3, 4)
    assert rgba[0, 2].tolist() == [0, 0, 0, 0]  # no group: transparent
    assert rgba[0, 0].tolist() == hex_rgba(GROUP_PALETTE[0]).tolist() == [0x1F, 0x77, 0xB4, 255]
    assert rgba[1, 1].tolist() == rgba[0, 1].tolist()
    assert len(set(GROUP_PALETTE)) == len(GROUP_PALETTE) == 20


def test_outline_cells_keeps_the_border_of_each_cell():
    colors = group_colors(np.array([[0, -1], [1, 2]]))
    out = outline_cells(colors, 4, width=1)
    assert out.shape == (8, 8)
    assert out[0, 0] == out[3, 3] == out[0, 2] == colors[0, 0]  # border of cell (0, 0)
    assert out[1, 1] == out[2, 2] == 0  # its inside is clear
    assert (out[0:4, 4:8] == 0).all()  # no group: nothing drawn
    assert out[7, 7] == colors[1, 1]


def test_top_group_patches_match_brute_force_and_merge_across_batches():
    rng = np.random.default_rng(3)
    weights = rng.random((6, 3, 4, 3)).astype(np.float16)
    groups = np.argmax(weights, axis=-1).astype(np.int16)
    groups[2] = -1  # an image that was not factorised
    ids = np.arange(10, 16)
    whole = top_group_patches(groups, weights, ids, 4)
    merged = top_group_patches(groups[3:], weights[3:], ids[3:], 4, top_group_patches(groups[:3], weights[:3], ids[:3], 4))
    assert whole == merged
    for g, patches in enumerate(whole):
        cand = [(float(weights[i, y, x, g]), int(ids[i]), y, x) for i in range(6) for y in range(3) for x in range(4)
                if groups[i, y, x] == g]
        best = sorted(cand, key=lambda c: (-c[0], c[1], c[2], c[3]))[:4]
        assert [(p.weight, p.image, p.y, p.x) for p in patches] == best
        assert all(p.image != 12 for p in patches)


def test_groups_overlay_colours_the_page_from_stored_groups(tmp_path):
    from hoverlay.explorer.app import create_app
    from hoverlay.pipeline.factorize import factorize
    from hoverlay.stores.groups import read_groups

    url = str(tmp_path / "groups")
    make_synthetic_store(url, 6, layers=LAYERS, image_size=S, chunk=4)
    factorize(url, "coarse", k=3, images=[0, 1, 2, 3], quiet=True)
    app = create_app(url, page_size=6, ncols=3, browser_hover_budget=0).app  # the server draws: readable here
    g = app.grid.groups
    assert list(g.layers) == ["coarse"] and g.panel.visible
    g.mode.value = "groups"
    fig = next(f for f in app.grid.figures if f.layer == "coarse")
    image = g._sources["coarse"].data["image"][0]
    want = group_colors(fig.spec.mosaic(read_groups(app.state.reader, "coarse", np.arange(6))[0].astype(np.float32), 6))
    np.testing.assert_array_equal(image, want)
    stored = read_groups(app.state.reader, "coarse", np.arange(6))[0]
    assert (stored[4:] == -1).all()  # images 4, 5 not factorised: transparent on the page
    assert g._renderers["coarse"][1].visible and not g._renderers["coarse"][0].visible
    cards = [o.object for o in g.legend.objects if "group-legend-item" in str(getattr(o, "object", ""))]
    assert len(cards) == 3 and 'data-group="0"' in cards[0] and cards[0].count("group-patch") == 4
    g.mode.value = "groups + similarity"  # similarity still follows the pointer under group outlines
    assert all(r.visible for r in g._renderers["coarse"])
    app.grid._on_pointer("data", None, {"tile": [1], "y": [2], "x": [3], "click": [0]})
    assert np.nanmax(fig.source.data["image"][0]) == pytest.approx(1.0, abs=2e-3)
    # the exported PNG shows the groups' colours and their legend under the grids
    from PIL import Image

    from hoverlay.explorer.export import palette_rgb
    from hoverlay.explorer.groups_view import GROUP_PALETTE

    png = np.asarray(Image.open(io.BytesIO(app.grid.export_png().getvalue())).convert("RGB"))
    legend_row = png[-12]  # through one row of 12 px swatches (18 px from the bottom): x = 0, 120, 240
    for g_i in range(3):
        assert legend_row[120 * g_i + 5].tolist() == palette_rgb([GROUP_PALETTE[g_i]])[0].tolist()
    g.mode.value = "similarity"
    plain = np.asarray(Image.open(io.BytesIO(app.grid.export_png().getvalue())).convert("RGB"))
    assert plain.shape[0] < png.shape[0]  # no legend without the groups overlay


# ----------------------------------------------------------------------------------- compare
def test_pair_by_hash():
    a = ["x", "y", "", "z", "y", "w"]
    b = ["z", "q", "x", "", "x", "y"]
    ids_a, ids_b = pair_by_hash(a, b)
    assert ids_a.tolist() == [0, 1, 3] and ids_b.tolist() == [2, 5, 0]  # order of a, first occurrences
    assert ids_a.dtype == ids_b.dtype == np.int64
    assert [x.tolist() for x in pair_by_hash([], b)] == [[], []]
    assert [x.tolist() for x in pair_by_hash(["", ""], ["", ""])] == [[], []]  # failed images never pair


def test_relative_cell_snaps_an_image_location_to_each_grid():
    assert relative_cell(0.5, 0.25, (14, 14)) == (7, 3)
    assert relative_cell(0.5, 0.25, (28, 28)) == (14, 7)
    assert relative_cell(1.0, 1.0, (7, 7)) == (6, 6)  # the far edge belongs to the last cell
    assert relative_cell(0.0, 0.999, (4, 4)) == (0, 3)


def test_pointer_location_drops_rows_no_page_writes():
    assert pointer_location({"tile": [2, 2], "v": [0.5, 0.5], "u": [1.0, 1.0]}, 4) == (2, 0.5, 1.0)
    for bad in ({"tile": [4], "v": [0.5], "u": [0.5]}, {"tile": [0], "v": [1.5], "u": [0.5]},
                {"tile": [0], "v": [float("nan")], "u": [0.5]}, {"tile": [None], "v": [0.5], "u": [0.5]},
                {"tile": [], "v": [], "u": []}, {"tile": [0]}):
        assert pointer_location(bad, 4) is None, bad


def test_compare_view_shows_both_stores_for_one_location(tmp_path):
    from hoverlay.explorer.app import create_app

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_synthetic_store(a, 6, layers={"l": LayerGeometry(8, 8, 16)}, image_size=S, chunk=4, seed=0)
    make_synthetic_store(b, 6, layers={"m": LayerGeometry(4, 4, 8)}, image_size=48, chunk=4, seed=0)
    # same content hashes for a's images 0..5 and b's (seed 0 -> hashes syn-0-i)
    app = create_app([a, b], page_size=4, ncols=2).app
    view = app.compare_view
    assert view is not None and view.n_pairs == 6
    view.activate()
    view.pointer.data = {"fig": ["A", "B"], "tile": [2, 2], "y": [0, 0], "x": [0, 0], "cx": [0, 0], "cy": [0, 0],
                         "w": [0, 0], "h": [0, 0], "u": [0.4, 0.4], "v": [0.8, 0.8]}
    ra, rb = open_store(a), open_store(b)
    for side, reader, layer, cell in ((view.sides[0], ra, "l", (6, 3)), (view.sides[1], rb, "m", (3, 1))):
        q = reader.vectors(layer, 2)[cell].astype(np.float64)
        want = np.einsum("nhwd,d->nhw", reader.vectors(layer, np.arange(4)).astype(np.float64), q)
        mosaic = side.figure.source.data["image"][0]
        assert np.nanmax(mosaic) == pytest.approx(1.0, abs=2e-3)
        got = np.sort(mosaic[np.isfinite(mosaic)])
        np.testing.assert_allclose(got, np.sort(want.ravel()), atol=1e-5)
    assert create_app([a, b], compare=False).app.compare_view is None
    other = str(tmp_path / "other")
    make_synthetic_store(other, 3, layers={"m": LayerGeometry(4, 4, 8)}, image_size=S, chunk=4, seed=1)
    lonely = create_app([a, other], compare=True).app
    assert lonely.compare_view is None and "share images" in lonely.state.message
    assert "two stores" in create_app(a, compare=True).app.state.message
