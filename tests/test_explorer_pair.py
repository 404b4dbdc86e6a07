"""Two pinned queries side by side (#15 part 3): A's and B's maps over the page, A − B, both top-k.

A synthetic store, the explorer's state and views in-process (no browser): the figures' data is
compared with a float64 reference from the stored vectors.
"""

from __future__ import annotations

import numpy as np
import pytest

from hoverlay.explorer.engine import Query
from hoverlay.stores import LayerGeometry, open_store
from hoverlay.stores.synthetic import make_synthetic_store

S = 32
LAYERS = {"fine": LayerGeometry(8, 8, 16), "coarse": LayerGeometry(2, 2, 8)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("pair") / "store")
    make_synthetic_store(url, 12, layers=LAYERS, image_size=S, chunk=8, labels=("x", "y"))
    return url


def reference(reader, layer: str, ids: list[int], q: Query) -> np.ndarray:
    """Cosine of every page patch of ``layer`` to query ``q`` mapped into ``layer``, in float64."""
    from hoverlay.explorer.kernels import map_patch

    src, dst = reader.geometry(q.layer), reader.geometry(layer)
    y, x = map_patch(q.y, q.x, (src.height, src.width), (dst.height, dst.width))
    qv = reader.vectors(layer, [q.image]).astype(np.float64)[0, int(y), int(x)]
    page = reader.vectors(layer, ids).astype(np.float64)
    return np.einsum("nhwd,d->nhw", page, qv) / np.linalg.norm(qv)


def test_pin_a_then_b_shows_both_maps_their_difference_and_both_topk(store):
    from hoverlay.explorer.app import create_app

    app = create_app(store, page_size=4, ncols=2, k=3, browser_hover_budget=0).app
    state = app.state
    assert not app.pair._layout.visible and not app.topk_b._layout.visible  # nothing before B
    app.grid._on_pointer("data", None, {"tile": [1], "y": [2], "x": [3], "click": [1]})  # pin (1,2,3)
    assert state.pinned and state.current == Query(1, 2, 3, "fine")
    state.pin_b()  # the shown query becomes B; A follows the pointer again
    assert state.second == Query(1, 2, 3, "fine") and not state.pinned and (state.query_b, state.query_b_layer) == (
        "1,2,3", "fine")
    app.grid._on_pointer("data", None, {"tile": [2], "y": [5], "x": [0], "click": [2]})  # pin A = (2,5,0)
    assert state.pinned and state.current == Query(2, 5, 0, "fine")
    assert app.pair._layout.visible and app.topk_b._layout.visible
    reader = open_store(store)
    ids = state.page_ids().tolist()
    maps = app.pair.maps()
    for layer in ("fine", "coarse"):
        want_a = reference(reader, layer, ids, Query(2, 5, 0, "fine"))
        want_b = reference(reader, layer, ids, Query(1, 2, 3, "fine"))
        got_a, got_b, diff = maps[layer]
        np.testing.assert_allclose(got_a, want_a, atol=2e-3)
        np.testing.assert_allclose(got_b, want_b, atol=2e-3)
        np.testing.assert_allclose(diff, want_a - want_b, atol=4e-3)
        mosaics = [np.asarray(f.source.data["image"][0]) for f in app.pair.figures[layer]]
        assert all(np.isfinite(m).sum() == len(ids) * np.prod(state.hw(layer)) for m in mosaics)
    a_fig, _, d_fig = app.pair.figures["fine"]
    assert d_fig.mapper.low == -d_fig.mapper.high  # the difference's range is symmetric about 0
    # both top-k lists: A's (the settled pinned query) and B's
    assert "#2 (5,0)" in app.topk.head.object and "Query B" in app.topk_b.head.object
    assert "#1 (2,3)" in app.topk_b.head.object and app.topk_b.cards.cards[0]["image"] == 1
    assert app.topk_b.cards.cards[0]["score"] == pytest.approx(1.0, abs=1e-3)  # B's own patch first
    assert "B: #1 (2,3) in fine" in app.controls.pin_state.object
    state.unpin_b()
    assert state.second is None and not app.pair._layout.visible and not app.topk_b._layout.visible


def test_query_b_in_the_url_is_validated_and_restored(store):
    from hoverlay.explorer.app import ExplorerApp

    app = ExplorerApp([store], url={"query": "3,1,1", "query_layer": "coarse", "query_b": "0,7,7",
                                    "query_b_layer": "fine"})
    assert app.state.second == Query(0, 7, 7, "fine") and app.state.current == Query(3, 1, 1, "coarse")
    assert app.pair._layout.visible
    bad = ExplorerApp([store], url={"query_b": "99,0,0"})
    assert "bad query B" in bad.state.message and bad.state.query_b == "" and bad.state.second is None
    worse = ExplorerApp([store], url={"query_b": "1,0,0", "query_b_layer": "<b>x</b>"})
    assert "bad query B: unknown layer '<b>x</b>'" in worse.state.message and worse.state.second is None
