"""The explorer's state object alone: no Panel, no Bokeh, no browser.

:class:`ExplorerState` holds and validates what a session shows; views only react to its
outputs (``view``, ``current``, ``settled``, ``pinned``). These tests drive it the way widgets,
URLs and the pointer do and watch its outputs as a view would.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from hoverlay.explorer.engine import Query
from hoverlay.explorer.state import ExplorerState, PageView
from hoverlay.stores import LayerGeometry
from hoverlay.stores.synthetic import make_synthetic_store

S = 32
LAYERS = {"fine": LayerGeometry(8, 8, 16), "coarse": LayerGeometry(2, 2, 8)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("state")
    a, b = str(root / "a"), str(root / "b")
    make_synthetic_store(a, 24, layers=LAYERS, image_size=S, chunk=8, labels=("x", "y", "z"))
    make_synthetic_store(b, 10, layers={"b1": LayerGeometry(4, 4, 8), "b2": LayerGeometry(2, 2, 8),
                                        "b3": LayerGeometry(1, 1, 8), "b4": LayerGeometry(1, 1, 4)},
                         image_size=S, chunk=8, labels=("p",), seed=5)
    return a, b


def started(*stores: str, url: dict | None = None, **options) -> ExplorerState:
    state = ExplorerState(list(stores), url=url, **options)
    state.start()
    return state


class Events:
    """What a view depending on the outputs would be called with (one call per batch)."""

    def __init__(self, state: ExplorerState):
        self.calls: list[tuple[str, ...]] = []
        state.param.watch(lambda *events: self.calls.append(tuple(e.name for e in events)),
                          ["view", "current", "settled", "pinned"])


def test_the_state_module_imports_neither_panel_nor_bokeh():
    code = ("import sys, hoverlay.explorer.state\n"
            "print(sorted(m for m in ('panel', 'bokeh', 'holoviews', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_start_publishes_a_validated_view(stores):
    state = started(stores[0], page_size=6, ncols=3)
    view = state.view
    assert isinstance(view, PageView)
    assert view.layers == ("fine", "coarse") and view.active_layer == "fine"
    assert view.ids == (0, 1, 2, 3, 4, 5) and (view.page, view.pages, view.total) == (1, 4, 24)
    assert state.current is None and state.settled is None and not state.pinned


@pytest.mark.parametrize(("name", "value", "says", "then"), [
    ("layer", "bogus", "unknown layer 'bogus'", ("layer", "fine")),
    ("function", "<b>x</b>", "unknown similarity function", ("function", "cosine")),
    ("page", 99, "page 99 does not exist", ("page", 4)),
    ("query", "77,0,0", "image 77 is outside", ("query", "")),
    ("query", "1,9,0", "y 9 is outside", ("query", "")),
    ("query_layer", "nope", "unknown query layer 'nope'", ("query_layer", "")),
])
def test_a_bad_input_is_a_message_and_a_fallback(stores, name, value, says, then):
    state = started(stores[0], page_size=6)
    setattr(state, name, value)
    assert says in state.message
    assert getattr(state, then[0]) == then[1]
    assert state.view.function == "cosine" and 1 <= state.view.page <= 4


def test_a_batch_of_inputs_publishes_once_and_whole(stores):
    state = started(stores[0], page_size=6, ncols=3)
    events = Events(state)
    state.param.update(page_size=4, ncols=2, page=3)
    assert len(events.calls) == 1
    view = state.view
    assert (view.page_size, view.ncols, view.page) == (4, 2, 3) and view.ids == (8, 9, 10, 11)


def test_several_bad_url_values_are_one_message(stores):
    state = started(stores[0], url={"layer": "zz", "page": "many", "function": "nope", "layers_shown": ["q"]})
    for part in ("unknown layer 'zz'", "bad URL value page='many'", "unknown similarity function 'nope'",
                 "bad URL value layers=['q']"):
        assert part in state.message
    assert state.view.layers == ("fine", "coarse") and state.view.page == 1


def test_hover_rest_and_pin(stores):
    state = started(stores[0], page_size=6)
    state.hover(Query(2, 3, 4, "fine"))
    assert state.current == Query(2, 3, 4, "fine") and state.settled is None  # moving, not resting
    state.rest()
    assert state.settled == Query(2, 3, 4, "fine")
    state.click(Query(2, 3, 4, "fine"))
    assert state.pinned and (state.query, state.query_layer) == ("2,3,4", "fine")
    state.hover(Query(5, 0, 0, "fine"))  # the pointer moves on: a pin stays
    assert state.current == Query(2, 3, 4, "fine")
    state.layer = "coarse"  # the pin keeps its own layer's cell
    assert state.current == Query(2, 3, 4, "fine") and state.view.active_layer == "coarse"
    state.click(Query(5, 1, 1, "coarse"))  # unpin, following the clicked patch
    assert not state.pinned and state.query == "" and state.current == Query(5, 1, 1, "coarse")
    assert state.settled == Query(5, 1, 1, "coarse")


def test_a_hovered_patch_moves_to_the_new_layer_on_a_layer_switch(stores):
    state = started(stores[0], page_size=6)
    state.hover(Query(2, 6, 1, "fine"))
    state.layer = "coarse"
    assert state.current == Query(2, 1, 0, "coarse")


def test_a_store_switch_shows_the_new_stores_defaults_and_drops_the_old_query(stores):
    a, b = stores
    state = started(a, b, page_size=6)
    state.hover(Query(2, 3, 4, "fine"))
    state.rest()
    state.store = b
    assert state.view.store == b and state.store_key == "b"
    assert state.view.layers == ("b1",) and state.layers_shown == ["b1"]  # 4 layers: the first only
    assert state.current is None and state.settled is None
    assert "other layers" in state.message
    state.choose_store("a")
    assert state.view.store == a and state.view.layers == ("fine", "coarse")
    state.choose_store("/etc/passwd")  # not a display name: ignored
    assert state.view.store == a


def test_outputs_are_not_options(stores):
    with pytest.raises(ValueError, match="set by the explorer"):
        ExplorerState([stores[0]], view=None)


def test_a_filter_and_paging(stores):
    state = started(stores[0], page_size=6)
    state.page = 2
    state.label = "y"
    assert state.view.page == 1 and state.view.total == 8
    labels = state.reader.table()["label"]
    assert all(labels[i] == "y" for i in state.view.ids)
    state.open_image(0)  # an image the filter hides: the filter is cleared
    assert state.label == "(all)" and 0 in state.view.ids


def test_tab_is_checked_against_the_tabs_the_app_has(stores):
    state = ExplorerState([stores[0]], url={"tab": 3})
    state.start(n_tabs=2)
    assert state.tab == 0 and "tab 3 does not exist; tabs are 0 to 1" in state.message
