"""Query the explorer with any image (#15 part 2), without a browser: a real store built by the
pipeline, the real model worker process, the explorer's state and views.

The uploaded image becomes the query tile; hovering it sets the query of every tile of the page
(here on the server path, so the overlays can be read back), a rest brings the top-k of the whole
store; a bad file is a message and changes nothing.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_generated_images
from mosaics import tiles_from_sources
from PIL import Image

from hoverlay.explorer.engine import Query
from hoverlay.explorer.query_worker import QueryWorkerConfig, configure_shared_worker, shared_worker
from hoverlay.explorer.sparse_fp16 import unpack
from hoverlay.pipeline.build import build
from hoverlay.stores import open_store

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("upload")
    images = write_generated_images(str(root / "images"), 6, seed=21, size=(96, 96))
    store = str(root / "store.zarr")
    build(str(root / "images"), store, model="python:test_query:tiny_model", layers=["1", "3"],
          size=64, quiet=True)
    configure_shared_worker(QueryWorkerConfig(threads=1, timeout=120.0, env={"PYTHONPATH": TESTS}))
    yield {"store": store, "image": images[2], "root": str(root)}
    shared_worker().close()
    configure_shared_worker(QueryWorkerConfig())


def png_bytes(path: str, angle: float = 0.0) -> bytes:
    buf = io.BytesIO()
    Image.open(path).rotate(angle).save(buf, format="PNG")
    return buf.getvalue()


def overlay(fig, s: int) -> np.ndarray:
    return tiles_from_sources(fig.source.data, fig.shared.rgb.data, fig.layer, s)


def store_files(store: str) -> dict[str, tuple[int, float]]:
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(store) for f in files}


def test_an_upload_is_the_query_tile_and_queries_every_tile_of_the_page(tiny_store):
    from hoverlay.explorer.app import create_app

    store = tiny_store["store"]
    before = store_files(store)
    app = create_app(store, page_size=4, ncols=2, browser_hover_budget=0, k=3).app  # the server draws
    app.upload.submit(png_bytes(tiny_store["image"], angle=15), "rotated <b>cat</b>.png")
    state = app.state
    uid = state.upload
    assert uid < 0 and state.is_upload(uid)
    assert [f.layer for f in app.upload.figures] == ["1", "3"]
    assert "rotated &lt;b&gt;cat&lt;/b&gt;" in app.upload.status.object  # shown as text, never as HTML
    # hover a patch of the query tile: the page's overlays are its similarity to every page patch
    app.upload._on_pointer("data", None, {"tile": [0], "y": [3], "x": [5], "click": [0]})
    assert state.current == Query(uid, 3, 5, "1")
    reader = open_store(store)
    page = state.page_ids()
    q_vec = state.external[uid]["1"].vectors[3 * 16 + 5].astype(np.float64)  # the upload's own vector
    page_vecs = reader.vectors("1", page).astype(np.float64)
    want = np.einsum("nhwd,d->nhw", page_vecs, q_vec) / np.maximum(np.linalg.norm(q_vec), 1e-12)
    fig = next(f for f in app.grid.figures if f.layer == "1")
    np.testing.assert_allclose(overlay(fig, reader.image_size), want, atol=2e-3)  # what the figure holds
    # the query tile shows its own self-similarity: 1 at the hovered patch
    own = app.upload.image_maps()["1"][0]
    assert own[3, 5] == pytest.approx(1.0, abs=1e-3)
    # a rest: the top-k of the whole store for the upload's patch, headed by its (escaped) name
    cards = app.topk.cards.cards
    assert len(cards) == 3 and "the upload" in app.topk.head.object \
        and "rotated &lt;b&gt;cat&lt;/b&gt;.png" in app.topk.head.object and "<b>cat" not in app.topk.head.object
    scores = [c["score"] for c in cards]
    assert scores == sorted(scores, reverse=True)
    # the tile's pointer rows are client input: anything no page writes is dropped
    for junk in ({"tile": [1]}, {"y": [99]}, {"x": [1.5]}, {"y": ["a"]}, {"click": [None]}):
        app.upload._on_pointer("data", None, {"tile": [0], "y": [1], "x": [1], "click": [0], **junk})
        assert state.current == Query(uid, 3, 5, "1"), junk
    # a click pins the upload's patch; the pin is a query like any other
    app.upload._on_pointer("data", None, {"tile": [0], "y": [3], "x": [5], "click": [1]})
    assert state.query == f"{uid},3,5" and state.pinned
    assert store_files(store) == before  # nothing was written to the store
    assert app.upload.shared.config.data["mode"] == [0, 0]  # the tile follows the grid's server path
    assert all(len(src.data["v"][0]) == 0 for src in app.upload.browser.vectors.values())


def test_on_the_browser_path_the_query_tile_holds_the_uploads_vectors(tiny_store):
    """The grid's page is on the browser path: the tile gets the upload's float16 vectors and
    norms (what the browser computes every map from, with no message per move) and the grid's
    path; a store image's query reaches the tile as a vector, not as server-drawn maps."""
    from hoverlay.explorer.app import create_app

    app = create_app(tiny_store["store"], page_size=4, ncols=2, k=3).app
    assert app.grid.path.browser and app.grid.link is app.upload.link and app.upload.link.browser
    app.upload.submit(png_bytes(tiny_store["image"], angle=15), "rotated.png")
    uid = app.state.upload
    assert app.upload.shared.config.data["mode"] == [1, 1]
    for layer in ("1", "3"):
        block = app.state.external[uid][layer]
        sent = app.upload.browser.vectors[layer].data
        values = unpack(sent["v"][0], sent["mask"][0], block.vectors.size)
        np.testing.assert_array_equal(values.astype(np.float32), block.vectors.reshape(-1))
        np.testing.assert_array_equal(sent["norm"][0], block.norms)
    app.grid._on_pointer("data", None, {"tile": [1], "y": [2], "x": [3], "click": [0]})  # a rest on the grid
    q = app.upload.browser.query.data
    assert q["fig"] == ["1", "3"] and q["pinned"] == [0, 0]
    image = [int(app.state.page_ids()[1])]
    np.testing.assert_allclose(q["q"][0], app.state.reader.vectors("1", image)[0, 2, 3], atol=2e-3)  # unit
    assert q["qn"][0] == pytest.approx(float(app.state.reader.norms("1", image)[0, 2, 3]), rel=1e-3)
    assert all(np.isnan(np.asarray(f.source.data["image"][0])).all() for f in app.upload.figures)  # not drawn here
    # a rebuilt grid's link callback replaces the old one (which would paint the figures it replaced)
    wakes = app.grid.link.source.js_property_callbacks["change:data"]
    assert len(wakes) == 2
    app.state.ncols = 1
    rebuilt = app.grid.link.source.js_property_callbacks["change:data"]
    assert len(rebuilt) == 2 and rebuilt != wakes
    grid_wake = next(cb for cb in rebuilt if cb.args["key"] == "grid")
    assert [ov.id for ov in grid_wake.args["ovs"]] == [f.source.id for f in app.grid.figures]


@pytest.mark.parametrize(("kind", "says"), [("empty", "is empty"), ("truncated", "truncated"),
                                            ("text", "not an image")])
def test_a_bad_upload_is_a_message_and_changes_nothing(tiny_store, kind, says):
    from hoverlay.explorer.app import create_app

    whole = png_bytes(tiny_store["image"])
    data = {"empty": b"", "truncated": whole[: len(whole) // 2], "text": b"hello, I am text"}[kind]
    app = create_app(tiny_store["store"], page_size=4).app
    app.upload.submit(data, "evil.png")
    assert says in app.upload.status.object
    assert app.state.upload == 0 and app.upload.figures == []
    app.grid._on_pointer("data", None, {"tile": [1], "y": [1], "x": [1], "click": [0]})  # the page still works
    assert app.state.current == Query(int(app.state.page_ids()[1]), 1, 1, "1")


def test_a_path_outside_the_allowed_folders_is_refused_without_naming_server_paths(tiny_store):
    from hoverlay.explorer.app import create_app

    allowed = os.path.dirname(tiny_store["image"])
    app = create_app(tiny_store["store"], page_size=4, query_folders=[allowed]).app
    app.upload.open_path("../../../etc/passwd")
    assert "not a file in the folders this server allows" in app.upload.status.object
    assert allowed not in app.upload.status.object and app.state.upload == 0
    app.upload.open_path(os.path.basename(tiny_store["image"]))  # relative to the allowed folder
    assert app.state.upload < 0
