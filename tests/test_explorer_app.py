"""The explorer's engine and app without a browser: numbers, validation, state transitions.

The browser tests (tests/ui) prove the same numbers reach Chromium; these run in a second and
pin down what the server computes and how bad input is handled.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from mosaics import tiles_from_sources

from hoverlay.explorer.engine import OverlayEngine, Query, parse_query_text
from hoverlay.explorer.sparse_fp16 import unpack
from hoverlay.stores import LayerGeometry, OutOfRangeError, open_store
from hoverlay.stores.synthetic import make_synthetic_store

S = 32
LAYERS = {"fine": LayerGeometry(8, 8, 16), "coarse": LayerGeometry(2, 2, 8)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("explorer") / "store")
    make_synthetic_store(url, 24, layers=LAYERS, image_size=S, chunk=8, labels=("x", "y", "z"))
    return url


@pytest.fixture
def app(store):
    """An app on the server path (budget 0): the server computes the maps, as for a large page."""
    from hoverlay.explorer.app import create_app

    layout = create_app(store, page_size=6, ncols=3, k=4, browser_hover_budget=0)
    return layout.app


@pytest.fixture
def browser_app(store):
    """An app on the default browser path: the server sends vectors, the browser draws."""
    from hoverlay.explorer.app import create_app

    return create_app(store, page_size=6, ncols=3, k=4).app


def _cosines(reader, layer, image, y, x, ids):
    q = reader.vectors(layer, image)[y, x].astype(np.float64)
    return np.einsum("nhwd,d->nhw", reader.vectors(layer, np.asarray(ids)).astype(np.float64), q)


def test_engine_page_maps_match_reference_with_layer_mapping(store):
    reader = open_store(store)
    engine = OverlayEngine(reader, ["fine", "coarse"])
    ids = np.array([3, 7, 1, 20])
    engine.set_page(ids)
    maps = engine.page_maps(Query(7, 6, 1, "fine"), "cosine")
    np.testing.assert_allclose(maps["fine"], _cosines(reader, "fine", 7, 6, 1, ids), atol=1e-5)
    # fine (6, 1) has centre (6.5, 1.5)/8 of the image -> coarse cell (1, 0)
    assert engine.mapped(Query(7, 6, 1, "fine"), "coarse") == (1, 0)
    np.testing.assert_allclose(maps["coarse"], _cosines(reader, "coarse", 7, 1, 0, ids), atol=1e-5)
    assert engine.page_maps(Query(7, 6, 1, "fine"), "cosine") is maps  # memoised
    engine.set_page([1, 2])
    assert engine.page_maps(Query(7, 6, 1, "fine"), "cosine")["fine"].shape == (2, 8, 8)


def test_engine_rejects_bad_queries_and_pages(store):
    engine = OverlayEngine(open_store(store), ["fine"])
    with pytest.raises(OutOfRangeError, match="image 24"):
        engine.validate(Query(24, 0, 0, "fine"))
    with pytest.raises(OutOfRangeError, match="x 8"):
        engine.validate(Query(0, 0, 8, "fine"))
    with pytest.raises(OutOfRangeError, match="image id 99"):
        engine.set_page([0, 99])
    assert parse_query_text(" 3, 4,5") == (3, 4, 5)
    with pytest.raises(ValueError, match="'3,4'"):
        parse_query_text("3,4")


def _overlay(fig) -> np.ndarray:
    """Per-tile maps cut out of a figure's overlay mosaic, located from the image tiles' positions."""
    return tiles_from_sources(fig.source.data, fig.shared.rgb.data, fig.layer, S)


def test_pointer_event_updates_overlays_in_place(app):
    reader = app.state.reader
    fine = next(f for f in app.grid.figures if f.layer == "fine")
    source_before = fine.source
    app.grid._on_pointer("data", None, {"tile": [4], "y": [2], "x": [5], "click": [0]})
    ids = app.state.page_ids()
    assert ids.tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(_overlay(fine), _cosines(reader, "fine", 4, 2, 5, ids), atol=1e-5)
    assert fine.source is source_before  # same model, new data: no plot rebuild
    mosaic = fine.source.data["image"]
    assert len(mosaic) == 1 and mosaic[0].dtype == np.float32 and mosaic[0].flags.c_contiguous
    assert np.isnan(mosaic[0]).sum() == mosaic[0].size - 6 * 8 * 8  # gaps are transparent
    # the layer view shows the query image with the mapped patch outlined
    mapped = dict(zip(app.query_view.mapped_source.data["fig"], zip(app.query_view.mapped_source.data["y"],
                                                          app.query_view.mapped_source.data["x"], strict=True),
                      strict=True))
    assert mapped == {"fine": (2, 5), "coarse": (0, 1)}
    # top-k (synchronous without a server): k hits, the hovered patch first
    cards = app.topk.cards.cards
    assert len(cards) == 4
    assert (cards[0]["image"], cards[0]["y"], cards[0]["x"]) == (4, 2, 5)
    assert cards[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert [c["score"] for c in cards] == sorted((c["score"] for c in cards), reverse=True)
    assert all(c["src"].startswith("data:image/jpeg;base64,") for c in cards)


def test_browser_path_sends_page_vectors_once_and_the_query_only_when_it_changes(browser_app):
    app = browser_app
    reader = app.state.reader
    assert app.grid.path.browser and "computed in this browser" in app.grid.page_info.object
    sent = sum(src.data[k][0].nbytes for src in app.grid.browser.vectors.values() for k in ("v", "mask", "norm"))
    assert sent < app.grid.path.page_bytes  # the zeros left out, and the page says so
    shown = f"{sent / 1e6:.1f} MB" if sent >= 100_000 else f"{sent / 1e3:.0f} kB"
    assert f"({shown} of page vectors; " in app.grid.page_info.object, app.grid.page_info.object
    ids = app.state.page_ids()
    for layer in ("fine", "coarse"):  # float16 bits and float32 norms of the page, flat
        data = app.grid.browser.vectors[layer].data
        want = reader.vectors(layer, ids).reshape(-1)
        np.testing.assert_array_equal(unpack(data["v"][0], data["mask"][0], want.size), want)
        np.testing.assert_allclose(data["norm"][0], reader.norms(layer, ids).reshape(-1))
    cfg = app.grid.shared.config.data
    assert cfg["mode"] == [1, 1] and cfg["fn"] == ["cosine", "cosine"] and cfg["D"] == [16, 8]
    assert app.grid.browser.hover.syncable is False and all(not f.source.syncable for f in app.grid.figures)
    before = [np.array(f.source.data["image"][0]) for f in app.grid.figures]
    vectors_model = app.grid.browser.vectors["fine"].data["v"][0]
    # a pointer rest: the server learns the query (layer view, top-k) but draws no map, and does
    # not send the query back: the browser rested there and keeps it (js.py's E.rested)
    query_data = app.grid.browser.query.data
    app.grid._on_pointer("data", None, {"tile": [4], "y": [2], "x": [5], "click": [0], "drawn": [1]})
    assert app.state.current == Query(4, 2, 5, "fine")
    for fig, old in zip(app.grid.figures, before, strict=True):
        np.testing.assert_array_equal(fig.source.data["image"][0], old)  # still all transparent
    assert app.grid.browser.query.data is query_data and app.grid.browser.query.data["fig"] == []
    # a rest the browser could not draw (the page's vectors arrived after the move): sent back
    for drawn in ([0], ["1"], [], None):
        app.grid._on_pointer("data", None, {"tile": [1], "y": [0], "x": [3], "click": [0], "drawn": drawn})
        sent = dict(zip(app.grid.browser.query.data["fig"], app.grid.browser.query.data["q"], strict=True))
        np.testing.assert_allclose(sent["fine"], reader.vectors("fine", 1)[0, 3].astype(np.float32))
        app.grid._on_pointer("data", None, {"tile": [4], "y": [2], "x": [5], "click": [0], "drawn": [1]})
    assert app.topk.cards.cards[0]["image"] == 4  # the rest ran the top-k search
    # a pin flags the query and sends it (the browser draws the pin whatever it hovers next);
    # the page's vectors are not sent again
    app.grid._on_pointer("data", None, {"tile": [4], "y": [2], "x": [5], "click": [1]})
    assert app.grid.browser.query.data["pinned"] == [1, 1]
    q = dict(zip(app.grid.browser.query.data["fig"], app.grid.browser.query.data["q"], strict=True))
    np.testing.assert_allclose(q["fine"], reader.vectors("fine", 4)[2, 5].astype(np.float32))
    np.testing.assert_allclose(q["coarse"], reader.vectors("coarse", 4)[0, 1].astype(np.float32))
    assert app.grid.browser.vectors["fine"].data["v"][0] is vectors_model
    # function and sigma reach the browser through the config; a new page sends new vectors
    app.state.function = "rbf"
    assert app.grid.shared.config.data["fn"] == ["rbf", "rbf"]
    number = app.grid.shared.config.data["page"][0]
    assert all(src.data["page"] == [number] for src in app.grid.browser.vectors.values())
    app.state.page = 2
    assert app.grid.browser.vectors["fine"].data["v"][0] is not vectors_model
    # the config names the new page, and so do its vectors (the browser draws only from those)
    assert app.grid.shared.config.data["page"] == [number + 1] * 2
    assert all(src.data["page"] == [number + 1] for src in app.grid.browser.vectors.values())


def test_the_grids_sources_share_one_selection_and_policy(browser_app):
    """Nothing in the explorer selects, so a grid's sources share one ``Selection`` and one
    selection policy instead of two models each (``SharedSources.source``)."""
    from bokeh.models import ColumnDataSource

    grid = browser_app.grid
    sources = {m for fig in grid.figures for m in fig.plot.references()
               if isinstance(m, ColumnDataSource) and m.name.startswith("grid-")}
    sources |= {grid.browser.hover, grid.browser.query, *(s for slot in grid.browser.slots for s in slot.values())}
    # images, captions, pointer, pin, config; an overlay per figure; hover, query; two vector slots per figure
    assert len(sources) == 5 + len(grid.figures) + 2 + 2 * len(grid.figures)
    assert {id(s.selected) for s in sources} == {id(grid.shared.selection)}
    assert {id(s.selection_policy) for s in sources} == {id(grid.shared.policy)}


def test_a_page_over_the_byte_budget_takes_the_server_path_and_says_so(store):
    from hoverlay.explorer.app import create_app

    app = create_app(store, page_size=6, ncols=3, browser_hover_budget=1000).app
    assert not app.grid.path.browser
    assert "exceed the browser budget of 1 kB" in app.grid.page_info.object
    assert app.grid.shared.config.data["mode"] == [0, 0]
    assert app.grid.browser.vectors["fine"].data["v"][0].size == 0
    app.grid._on_pointer("data", None, {"tile": [1], "y": [0], "x": [0], "click": [0]})
    assert np.isfinite(app.grid.figures[0].source.data["image"][0]).sum() == 6 * 8 * 8  # the server drew


def test_click_pins_then_unpins(app):
    app.grid._on_pointer("data", None, {"tile": [1], "y": [0], "x": [0], "click": [0]})
    app.grid._on_pointer("data", None, {"tile": [1], "y": [0], "x": [0], "click": [1]})
    assert app.state.query == "1,0,0"
    pinned = _overlay(app.grid.figures[0]).copy()
    app.grid._on_pointer("data", None, {"tile": [3], "y": [7], "x": [7], "click": [1]})  # move only
    np.testing.assert_array_equal(_overlay(app.grid.figures[0]), pinned)
    assert app.grid.shared.pin.data["fig"] == ["fine", "coarse"]
    app.grid._on_pointer("data", None, {"tile": [3], "y": [7], "x": [7], "click": [2]})
    assert app.state.query == "" and app.state.current == Query(3, 7, 7, "fine")
    assert app.grid.shared.pin.data["fig"] == []


@pytest.mark.parametrize(("name", "value", "message"), [
    ("layer", "bogus", "unknown layer 'bogus'"),
    ("query", "5,9,0", "y 9 is outside"),
    ("query", "77,0,0", "image 77 is outside"),
    ("query", "a,b", "is not 'image,y,x'"),
    ("function", "manhattan", "unknown similarity function 'manhattan'"),
    ("page", 99, "page 99 does not exist"),
])
def test_bad_state_gives_a_message_and_keeps_a_valid_state(app, name, value, message):
    setattr(app.state, name, value)
    assert message in app.state.message
    assert app.state.layer in app.state.reader.layers and app.state.function == "cosine"
    assert 1 <= app.state.page <= 4
    app.grid._on_pointer("data", None, {"tile": [0], "y": [1], "x": [1], "click": [0]})
    assert app.state.current is not None  # still hovering fine


def test_a_pinned_query_keeps_its_cell_when_the_pointer_snaps_to_another_layer(app):
    """Today's main re-expressed the pin in the coarser layer: fine (6,1) -> coarse (1,0) -> fine (4,2)."""
    app.state.query = "2,6,1"
    app.state.layer = "coarse"
    assert (app.state.query, app.state.query_layer, app.state.message) == ("2,6,1", "fine", "")
    assert app.state.current == Query(2, 6, 1, "fine")
    pin = dict(zip(app.grid.shared.pin.data["fig"], zip(app.grid.shared.pin.data["y"], app.grid.shared.pin.data["x"],
                                                   strict=True), strict=True))
    assert pin == {"fine": (6, 1), "coarse": (1, 0)}  # the coarse outline is the mapped cell
    app.state.layer = "fine"
    assert app.state.current == Query(2, 6, 1, "fine") and app.state.query == "2,6,1"
    # a hovered (unpinned) query follows the new layer's cells
    app.state.unpin()
    app.grid._on_pointer("data", None, {"tile": [2], "y": [6], "x": [1], "click": [0]})
    app.state.layer = "coarse"
    assert app.state.current == Query(2, 1, 0, "coarse") and app.state.query_layer == ""


def test_a_pin_names_its_layer_in_the_url_state(app):
    app.state.layer = "coarse"
    app.grid._on_pointer("data", None, {"tile": [3], "y": [1], "x": [1], "click": [0]})
    app.grid._on_pointer("data", None, {"tile": [3], "y": [1], "x": [1], "click": [1]})
    assert (app.state.query, app.state.query_layer) == ("3,1,1", "coarse")
    app.state.param.update(query="4,7,7", query_layer="fine")  # a URL naming a fine cell while snapping to coarse
    assert app.state.current == Query(4, 7, 7, "fine") and app.state.message == ""
    app.state.query_layer = "bogus"
    assert "unknown query layer 'bogus'" in app.state.message and app.state.query == ""


def test_function_changes_colour_range(app):
    coarse = next(f for f in app.grid.figures if f.layer == "coarse")
    app.state.function = "dot"
    from hoverlay.explorer.resources import get_layer_stats

    hi = get_layer_stats(app.state.store, "coarse").norm_hi
    assert (coarse.mapper.low, coarse.mapper.high) == pytest.approx((0.0, hi * hi))


def test_paging_and_similarity_order(app):
    app.state.page = 2
    assert app.state.page_ids().tolist() == [6, 7, 8, 9, 10, 11]
    app.state.label = "y"
    assert app.state.page == 1 and all(app.state.reader.table()["label"][i] == "y" for i in app.state.page_ids())
    app.state.label = "(all)"
    app.grid._on_pointer("data", None, {"tile": [0], "y": [3], "x": [3], "click": [0]})
    app.state.sort_by_similarity()
    assert app.state.order == "similar" and app.state.page_ids()[0] == 0  # the query image is most similar
    # every image stays reachable, those the search found first (today's main dropped the others)
    assert sorted(app.state.order_ids.tolist()) == list(range(24))
    ranked = int(np.isin(app.state.order_ids, app.state._ranked).sum())
    assert app.state.order_ids[:ranked].tolist() == [i for i in app.state._ranked.tolist()]
    info = app.grid.page_info.object
    assert f"{ranked} ranked by their best patch among the 400 nearest patches" in info
    assert (ranked == 24) or f"{24 - ranked} more follow in store order" in info


def test_similarity_order_keeps_unranked_candidates_after_the_ranked_ones():
    from hoverlay.explorer.paging import ordered_ids

    cand = np.array([1, 2, 3, 5, 8])
    assert ordered_ids(cand, "similar", ranked=[8, 4, 2]).tolist() == [8, 2, 1, 3, 5]
    assert ordered_ids(cand, "similar", ranked=[]).tolist() == [1, 2, 3, 5, 8]


def test_export_png_is_the_page_as_shown_with_colour_bars_and_the_query_outlined(app):
    from PIL import Image

    from hoverlay.explorer.export import colorize
    from hoverlay.explorer.figures import palette

    app.grid._on_pointer("data", None, {"tile": [1], "y": [3], "x": [5], "click": [0]})
    img = np.asarray(Image.open(io.BytesIO(app.grid.export_png().getvalue())).convert("RGB"))
    ncols, gap, band, title, bar_w, bar_text = 3, 6, 14, 16, 10, 44
    grid_w = ncols * (S + gap) - gap
    grid_h = 2 * (S + gap + band) - gap
    block_w = grid_w + gap + bar_w + bar_text
    assert img.shape[:2] == (title + grid_h, 2 * block_w + 2 * gap)
    pal = palette(app.state.cmap)
    for li, layer in enumerate(("fine", "coarse")):
        ox = li * (block_w + 2 * gap)
        bar = img[title:title + grid_h, ox + grid_w + gap + bar_w // 2]  # the colour bar column
        clim = app.state.clim(layer)
        top, _ = colorize(np.array([clim[1]]), clim, pal)
        bottom, _ = colorize(np.array([clim[0]]), clim, pal)
        assert bar[0].tolist() == top[0].tolist() and bar[-1].tolist() == bottom[0].tolist()
    # the query cell of tile 1 (fine (3, 5): an S/8 px cell) is outlined in red over a black halo
    x0, y0 = 1 * (S + gap), title + band
    cell = S // 8
    edge = img[y0 + 3 * cell + cell // 2, x0 + 5 * cell - 1: x0 + 5 * cell + 3]
    assert any(p.tolist() == [255, 59, 48] for p in edge) and any(p.tolist() == [0, 0, 0] for p in edge)
    # the similarity itself: a pixel inside another tile's cell is the image blended with the map colour
    maps = app.grid.engine.page_maps(app.state.current, "cosine")["fine"]
    px = app.state.reader.pixels(np.array([0]))[0].astype(np.float32)
    y, x = 2 * cell + 1, 6 * cell + 1  # cell (2, 6) of tile 0, off the outline
    rgb, _ = colorize(np.array([maps[0, 2, 6]]), app.state.clim("fine"), pal)
    want = (px[y, x] * (1 - app.state.alpha) + rgb[0] * app.state.alpha).round()
    np.testing.assert_allclose(img[title + band + y, x], want, atol=1)


def test_explorer_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, explorer.app, explorer.serve, explorer.kernels; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_scheduler_runs_deferred_work_in_a_running_loop_and_inline_without_one():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from hoverlay.explorer.session import Scheduler

    ran = []
    sync = Scheduler(None)
    assert sync.synchronous
    sync.later(lambda: ran.append("now"), 500)
    sync.in_thread(ThreadPoolExecutor(1), lambda a: a * 2, 21, done=lambda r, e: ran.append(r))
    assert ran == ["now", 42]

    async def main() -> list:
        out: list = []
        sched = Scheduler(None)  # a notebook kernel: a running loop, no server session
        assert not sched.synchronous
        cancelled = sched.later(lambda: out.append("cancelled"), 10)
        sched.cancel(cancelled)
        sched.later(lambda: out.append("timer"), 10)
        with ThreadPoolExecutor(1) as pool:
            sched.in_thread(pool, lambda: 1 / 0, done=lambda r, e: out.append(type(e).__name__))
            await asyncio.sleep(0.2)
        return out

    assert sorted(asyncio.run(main())) == ["ZeroDivisionError", "timer"]


def test_when_done_reports_a_cancelled_future_as_an_error_instead_of_raising():
    """The read-ahead cancels pages it no longer keeps; whoever waits on one hears CancelledError."""
    import asyncio
    from concurrent.futures import CancelledError, Future

    from hoverlay.explorer.session import Scheduler

    got: list = []
    gone: Future = Future()
    gone.cancel()
    Scheduler(None).when_done(gone, lambda r, e: got.append((r, type(e))))
    assert got == [(None, CancelledError)]

    async def main() -> list:
        out: list = []
        later: Future = Future()
        Scheduler(None).when_done(later, lambda r, e: out.append((r, type(e))))
        later.cancel()
        await asyncio.sleep(0.05)
        return out

    assert asyncio.run(main()) == [(None, CancelledError)]


def test_numeric_inputs_pin_an_exact_query(app):
    qimage, qy, qx = app.controls.query_inputs
    qimage.value, qy.value, qx.value = 5, 7, 2
    app.controls.pin_button.clicks += 1  # what a click in the browser does
    assert app.state.query == "5,7,2" and app.state.current == Query(5, 7, 2, "fine")
    assert "pinned" in app.controls.pin_state.object
    np.testing.assert_allclose(_overlay(app.grid.figures[0]),
                               _cosines(app.state.reader, "fine", 5, 7, 2, app.state.page_ids()), atol=1e-5)


def test_a_new_session_sees_images_committed_meanwhile(tmp_path):
    from hoverlay.explorer.app import create_app
    from hoverlay.stores.synthetic import append_synthetic_images

    url = str(tmp_path / "growing")
    make_synthetic_store(url, 8, layers=LAYERS, image_size=S, chunk=8)
    first = create_app(url).app
    assert first.state.reader.n_images == 8
    append_synthetic_images(url, 8, seed=5, label="new")  # a scheduled pipeline run appends 8 images
    second = create_app(url, page_size=16).app
    assert second.state.reader.n_images == 16 and second.state.page_ids().tolist() == list(range(16))
    assert "new" in second.state.param.label.objects
    second.grid._on_pointer("data", None, {"tile": [12], "y": [0], "x": [0], "click": [0]})
    assert second.topk.cards.cards  # the exact search covers the new images too


def test_switching_store_while_a_topk_search_runs_never_mixes_the_stores(store, tmp_path):
    """A search started on one store finishes on that store; its hits are dropped, not shown on
    the other, and the hovered patch of the new store is searched next."""
    from hoverlay.explorer.app import create_app

    small = str(tmp_path / "small")
    make_synthetic_store(small, 5, layers=LAYERS, image_size=S, chunk=8, seed=3)
    app = create_app([store, small], page_size=6, k=4).app
    held: list = []  # our own scheduler holds searches until the test releases them (the race)
    app.topk._scheduler.in_thread = lambda executor, fn, *args, done: held.append((fn, args, done))

    def release() -> tuple:
        fn, args, done = held.pop(0)
        result = fn(*args)
        done(result, None)
        return result

    app.grid._on_pointer("data", None, {"tile": [5], "y": [6], "x": [6], "click": [0]})  # image 5 of 24
    assert len(held) == 1 and held[0][1][0] == store
    app.state.store = small  # switch while the search for image 5 is in flight
    app.grid._on_pointer("data", None, {"tile": [2], "y": [1], "x": [3], "click": [0]})
    first = release()
    assert first[0] == store and first[1].image == 5  # searched the store it was asked for
    assert "failed" not in app.state.message and app.topk.cards.cards == []  # old hits not shown
    assert len(held) == 1 and held[0][1][0] == small  # the new store's patch is searched next
    release()
    cards = app.topk.cards.cards
    assert (cards[0]["image"], cards[0]["y"], cards[0]["x"]) == (2, 1, 3)
    assert all(c["image"] < 5 for c in cards)


def test_a_url_with_several_bad_values_reports_all_of_them(app):
    # what a URL with several bad values (Panel's location sync through UrlState) applies
    app.state.apply_url({"layer": "bogus", "page": "abc", "function": "manhattan", "query": "99,0,0"})
    for says in ("unknown layer 'bogus'", "bad URL value page='abc'", "unknown similarity function 'manhattan'",
                 "image 99 is outside"):
        assert says in app.state.message
    assert (app.state.layer, app.state.function, app.state.query, app.state.page) == ("fine", "cosine", "", 1)
    app.grid._on_pointer("data", None, {"tile": [0], "y": [1], "x": [1], "click": [0]})  # still works
    np.testing.assert_allclose(_overlay(app.grid.figures[0]), _cosines(app.state.reader, "fine", 0, 1, 1, app.state.page_ids()),
                               atol=1e-5)


def test_opening_a_topk_card_brings_its_image_onto_the_page_and_bad_messages_are_ignored(app):
    # what a click on a card's "open #20" button sends back from the browser
    app.topk.cards._handle_msg({"open": 20})
    assert 20 in app.state.page_ids().tolist() and app.state.page == 4
    for junk in ({"open": "../etc"}, {"open": None}, "open", {"open": 10**30}, {"open": -5}):
        app.topk.cards._handle_msg(junk)
        assert 1 <= app.state.page <= 4 and len(app.state.page_ids()) > 0


def test_switching_to_a_store_with_other_layers_shows_its_own_layers_with_a_message(store, tmp_path):
    """Today's main left *Layers shown* naming the old store's layers (events discarded), which the
    page then sent back: 'unknown layer', an empty grid."""
    from hoverlay.explorer.app import create_app

    other = str(tmp_path / "other")
    make_synthetic_store(other, 10, layers={"b1": LayerGeometry(4, 4, 8), "b2": LayerGeometry(2, 2, 8)},
                         image_size=S, chunk=8, labels=("p",), seed=5)
    app = create_app([store, other], page_size=6).app
    layers_widget = next(w for w in app.controls.sidebar if getattr(w, "name", "") == "Layers shown")
    layer_select = app.controls.layer_select
    app.state.store = other
    assert app.state.layers_shown == ["b1", "b2"] and app.state.layer == "b1"
    assert layers_widget.value == ["b1", "b2"] and list(layers_widget.options) == ["b1", "b2"]
    assert layer_select.value == "b1" and list(layer_select.options) == ["b1", "b2"]
    assert "other layers: showing b1, b2" in app.state.message
    assert [f.layer for f in app.grid.figures] == ["b1", "b2"]
    app.grid._on_pointer("data", None, {"tile": [2], "y": [3], "x": [1], "click": [0]})
    assert app.state.current == Query(2, 3, 1, "b1")
    app.grid._on_pointer("data", None, {"tile": [2], "y": [3], "x": [1], "click": [1]})  # a pin: sent
    assert app.grid.browser.query.data["fig"] == ["b1", "b2"] and app.state.pinned
    app.state.store = store  # and back
    assert app.state.layers_shown == ["fine", "coarse"] and layers_widget.value == ["fine", "coarse"]


def test_a_url_restores_the_whole_view(store, tmp_path):
    from hoverlay.explorer.app import ExplorerApp

    other = str(tmp_path / "second")
    make_synthetic_store(other, 8, layers=LAYERS, image_size=S, chunk=8, labels=("x",), seed=2)
    url = {"store_key": "store", "layers_shown": ["coarse"], "layer": "coarse", "query": "7,6,1",
           "query_layer": "fine", "page": 2, "page_size": 3, "ncols": 2, "function": "dot",
           "value_range": "symmetric", "label": "y", "order": "random", "seed": 4}
    app = ExplorerApp([other, store], url=url)
    assert app.state.store == store and app.state.message == ""
    for name, value in url.items():
        assert getattr(app.state, name) == value, name
    assert [f.layer for f in app.grid.figures] == ["coarse"]
    assert app.state.current == Query(7, 6, 1, "fine")
    labels = app.state.reader.table()["label"]
    ids = app.state.page_ids()
    assert len(ids) == 3 and all(labels[i] == "y" for i in ids)
    assert app.grid.specs["coarse"].ncols == 2
    # applying a URL in one step: the label filter does not reset the page the same URL names
    app.state.apply_url({"label": "x", "page": 2, "seed": 4})
    assert (app.state.label, app.state.page) == ("x", 2) and all(labels[i] == "x" for i in app.state.page_ids())


def test_bad_url_values_of_the_new_keys_give_one_message_and_a_valid_view(store):
    from hoverlay.explorer.app import ExplorerApp

    app = ExplorerApp([store], url={"store_key": "nope", "page_size": "many", "ncols": 99, "label": "<b>zz</b>",
                                    "layers_shown": ["bogus"], "tab": 5, "value_range": 3})
    for says in ("unknown store 'nope'", "bad URL value page_size='many'", "bad URL value ncols=99",
                 "bad URL value label='<b>zz</b>'", "bad URL value layers=['bogus']", "tab 5 does not exist",
                 "bad URL value range=3"):
        assert says in app.state.message, says
    assert (app.state.page_size, app.state.ncols, app.state.label, app.state.layers_shown, app.state.tab) == (16, 4, "(all)", ["fine", "coarse"], 0)
    app.grid._on_pointer("data", None, {"tile": [0], "y": [1], "x": [1], "click": [0]})
    assert app.state.current == Query(0, 1, 1, "fine")


def test_the_next_page_is_read_ahead_and_a_failed_read_ahead_is_read_again(browser_app, store):
    from concurrent.futures import ThreadPoolExecutor

    from hoverlay.explorer.prefetch import PagePrefetch

    app = browser_app
    layers = list(app.grid.browser.vectors)
    assert app.grid._prefetch._futures == {}  # a session that never pages nor hovers reads nothing ahead
    app.grid._on_pointer("data", None, {"tile": [0], "y": [1], "x": [1], "click": [0]})  # a rest on page 1
    assert app.grid._prefetch._key(app.state.reader, np.arange(6, 12), layers) in app.grid._prefetch._futures
    app.state.page = 2  # takes it
    nxt = np.arange(12, 18)
    ahead = app.grid._prefetch._futures.get(app.grid._prefetch._key(app.state.reader, nxt, layers))
    assert ahead is not None  # once it pages, the page after the shown one is read ahead
    data = ahead.result()
    np.testing.assert_array_equal(data.pixels, app.state.reader.pixels(nxt))
    packed, want = data.vectors["fine"], app.state.reader.vectors("fine", nxt)  # packed in the worker thread
    np.testing.assert_array_equal(unpack(packed.bits, packed.mask, want.size), want.reshape(-1))
    np.testing.assert_array_equal(packed.norms, app.state.reader.norms("fine", nxt).reshape(-1).astype(np.float32))
    app.state.page = 3  # takes it: the request is consumed, page 4 is requested
    assert app.grid._prefetch._key(app.state.reader, nxt, layers) not in app.grid._prefetch._futures
    assert app.grid._prefetch._key(app.state.reader, np.arange(18, 24), layers) in app.grid._prefetch._futures
    sent, want = app.grid.browser.vectors["fine"].data, app.state.reader.vectors("fine", nxt).reshape(-1)
    np.testing.assert_array_equal(unpack(sent["v"][0], sent["mask"][0], want.size), want)
    # a read that fails (here: images past the store's end) is not an empty page, it is read again
    pool = ThreadPoolExecutor(1)
    prefetch = PagePrefetch(lambda: pool)
    bad = np.array([22, 23, 24])
    prefetch.request(app.state.reader, bad, layers)
    assert prefetch.take(app.state.reader, bad, layers) is None
    pool.shutdown()


def test_the_query_view_is_made_once_the_page_has_loaded_and_joins_it_with_the_first_rest(browser_app):
    """A session's first rest must not pay for making the query view's figures (~0.2 of ~0.3 s
    of the server's loop each: 50 sessions' first rests waited for each other's builds); before
    any query nothing of the view is on the page (no empty colour bars, nothing for the browser
    to build while the user hovers)."""
    from hoverlay.explorer.query_view import HINT

    view = browser_app.query_view
    browser_app.on_load()  # without a server loop the deferred build runs at once
    built = list(view.figures)
    assert [f.layer for f in built] == list(browser_app.state.view.layers)
    assert not view._row.visible and view.head.object == HINT and view._row.objects == []
    browser_app.grid._on_pointer("data", None, {"tile": [1], "y": [2], "x": [5], "click": [0]})  # a rest
    assert view.figures == built and view._row.visible  # the same figures, now on the page
    assert [pane.object for pane in view._row.objects] == [f.plot for f in built]
    assert view.head.object != HINT


def test_a_crop_is_a_jpeg_of_the_hits_neighbourhood_with_the_patch_outlined(store):
    """Crops are JPEG (a fraction of PNG's encode time and bytes): the decoded crop still shows
    the store's pixels around the patch and the white-on-black outline where the cell is."""
    from PIL import Image

    from hoverlay.explorer.kernels import cell_bounds, crop_box
    from hoverlay.explorer.topk import Hit, crop_jpeg, crop_uri

    reader = open_store(store)
    hit = Hit(5, 4, 3, 0.9, "x")
    jpeg = crop_jpeg(reader, "fine", hit, size=96)
    assert crop_uri(jpeg).startswith("data:image/jpeg;base64,")
    crop = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float64)
    assert crop.shape == (96, 96, 3)
    x0, y0, x1, y1 = crop_box(4, 3, (8, 8), S)
    scale = 96 / (x1 - x0)
    bx0, by0, bx1, by1 = cell_bounds(4, 3, (8, 8), S)
    top, left = round((by0 - y0) * scale), round((bx0 - x0) * scale)
    right = round((bx1 - x0) * scale) - 1
    assert crop[top, left + 5:right - 5].mean() > 200  # the outline's white line
    assert crop[top + 2, left + 5:right - 5].mean() < 60  # inside it, the black one
    # away from the outline, the store's pixels (nearest-neighbour scaled) within JPEG's error
    source = np.asarray(reader.pixels(5))[y0:y1, x0:x1].astype(np.float64)
    expected = np.asarray(Image.fromarray(source.astype(np.uint8)).resize((96, 96), Image.Resampling.NEAREST))
    far = np.ones((96, 96), bool)
    far[max(0, top - 6):round((by1 - y0) * scale) + 6, max(0, left - 6):right + 7] = False
    assert np.abs(crop[far] - expected[far]).mean() < 4


def test_a_query_vector_off_the_page_is_the_stored_patch_without_making_its_image_block(store):
    """A rest's query vectors come from the reader's row, not from a float32 block of the
    whole image (which every rest paid for, three layers deep)."""
    reader = open_store(store)
    engine = OverlayEngine(reader, ["fine", "coarse"])
    engine.set_page([0, 1, 2])
    q = Query(9, 6, 1, "fine")
    vecs = engine.query_vectors(q)
    np.testing.assert_array_equal(vecs["fine"].unit, reader.vectors("fine", 9)[6, 1].astype(np.float32))
    assert vecs["fine"].norm == pytest.approx(float(reader.norms("fine", 9)[6, 1]))
    np.testing.assert_array_equal(vecs["coarse"].unit, reader.vectors("coarse", 9)[1, 0].astype(np.float32))
    assert (9, "fine") not in engine._image_blocks and (9, "coarse") not in engine._image_blocks
    on_page = engine.query_vectors(Query(1, 2, 2, "fine"))  # on the page: from its block, same values
    engine.block("fine")
    np.testing.assert_array_equal(engine.query_vectors(Query(1, 2, 2, "fine"))["fine"].unit, on_page["fine"].unit)


def test_every_colour_map_reaches_every_mapper_of_the_page(app):
    """The mappers are built and restyled without Bokeh's per-colour check (figures.color_mapper):
    the colours they hold must still be exactly the chosen map's, checked #rrggbb."""
    import re

    from holoviews.plotting.util import process_cmap

    from hoverlay.explorer.figures import palette
    from hoverlay.explorer.state import COLORMAPS

    assert app.grid.figures
    for name in COLORMAPS:
        app.state.cmap = name
        want = list(process_cmap(name, 256))
        assert all(re.fullmatch("#[0-9a-fA-F]{6}", c) for c in palette(name))
        for fig in app.grid.figures:
            assert fig.mapper.palette == want and fig.bar_mapper.palette == want


def test_a_paging_session_gets_the_next_pages_vectors_ahead_and_a_switch_to_it_sends_only_its_number(store):
    """The read-ahead's vectors go into the slot not shown; a switch to that page makes it the
    shown slot (config ``slot``, the page's number in its ``page`` column) and delivers nothing;
    a switch elsewhere delivers into the shown slot and leaves the ahead page where it is."""
    from hoverlay.explorer.app import create_app

    app = create_app(store, page_size=6, ncols=3, k=4).app
    grid, reader = app.grid, app.state.reader
    assert grid.browser.slot == 0 and all(src.data["page"] == [-1] or src.data["v"][0].size == 0
                                          for src in grid.browser.slots[1].values())
    app.state.page = 2  # the session pages: page 3 is read ahead and sent into slot 1
    browser = grid.browser
    nxt = np.arange(12, 18)
    for layer, src in browser.slots[1].items():
        assert src.data["page"] == [-1]
        want = reader.vectors(layer, nxt).reshape(-1)
        np.testing.assert_array_equal(unpack(src.data["v"][0], src.data["mask"][0], want.size), want)
    ahead = {layer: src.data["v"][0] for layer, src in browser.slots[1].items()}
    app.state.page = 3
    number = browser.page_number
    assert browser.slot == 1 and grid.shared.config.data["slot"] == [1] * len(browser.slots[1])
    assert grid.shared.config.data["page"][0] == number
    for layer, src in browser.vectors.items():
        assert src.data["page"] == [number] and src.data["v"][0] is ahead[layer]  # not sent again
    assert browser.vectors is browser.slots[1] and grid.path.sent_bytes == browser.sent_bytes > 0
    # page 4 went ahead into slot 0; going back to page 2 instead delivers into the shown slot (1)
    ahead0 = {layer: src.data["v"][0] for layer, src in browser.slots[0].items()}
    assert all(src.data["page"] == [-1] for src in browser.slots[0].values())
    app.state.page = 2
    assert browser.slot == 1
    for layer, src in browser.vectors.items():
        assert src.data["page"] == [browser.page_number]
        want = reader.vectors(layer, np.arange(6, 12)).reshape(-1)
        np.testing.assert_array_equal(unpack(src.data["v"][0], src.data["mask"][0], want.size), want)
    # ... and its own next page (3) replaced page 4 in the other slot
    for layer, src in browser.slots[0].items():
        assert src.data["page"] == [-1] and src.data["v"][0] is not ahead0[layer]
        want = reader.vectors(layer, np.arange(12, 18)).reshape(-1)
        np.testing.assert_array_equal(unpack(src.data["v"][0], src.data["mask"][0], want.size), want)


def test_no_page_goes_ahead_when_two_pages_exceed_the_budget(store):
    from hoverlay.explorer.app import create_app
    from hoverlay.explorer.browser_hover import page_vector_bytes

    reader = open_store(store)
    geometries = {n: reader.geometry(n) for n in ("fine", "coarse")}  # the layers shown
    one_page = page_vector_bytes(6, {n: (g.height, g.width, g.dim) for n, g in geometries.items()})
    tight = create_app(store, page_size=6, ncols=3, k=4, browser_hover_budget=int(1.5 * one_page)).app
    assert tight.grid.path.browser  # one page fits
    tight.state.page = 2
    tight.state.page = 3
    assert tight.grid.browser.slot == 0
    assert all(src.data["v"][0].size == 0 for src in tight.grid.browser.slots[1].values())
