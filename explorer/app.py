"""The explorer app: a page of images whose similarity overlays follow the pointer.

:class:`ExplorerApp` holds the state (store, layer, query, page, similarity function, ...) as
parameters, four of them mirrored in the URL. Its views are Bokeh figures built once
(:mod:`explorer.figures`) and then only fed arrays; every number comes from
:class:`explorer.engine.OverlayEngine` / :mod:`explorer.kernels`. The hover path:

1. the browser snaps the pointer to a patch and outlines it, and those of every shown layer
   (:mod:`explorer.js`) — no round trip;
2. only when the patch changes, one small pointer-source change reaches :meth:`_on_pointer`;
3. one memoised matmul per shown layer (:meth:`OverlayEngine.page_maps`);
4. one overlay source per layer updated in place inside ``pn.io.hold`` -> one websocket message.

Everything slower waits until the pointer rests (``topk_delay_ms``): the layer view (the query
image per layer with the mapped patch) and the dataset-wide top-k search, which runs in a worker
thread, one at a time per session, the latest request winning.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource
from holoviews.plotting.util import process_cmap

from hoverlay.stores import StoreError, StoreReader

from .browser_hover import DEFAULT_BUDGET, BrowserHover, HoverPath, choose_path
from .compare import CompareView, find_compare_pair
from .controls import Controls, build_controls
from .damage import TolerantReader
from .engine import OverlayEngine, Query, parse_query_text
from .export import ExportLayer, compose_grid_png
from .figures import OUTLINE_COLUMNS, LayerFigure, SharedSources, empty_columns, grid_specs
from .groups_view import GROUP_PALETTE, GroupsOverlay
from .kernels import SIMILARITY_FUNCTIONS, QueryVector, color_range, images_by_best_patch
from .paging import (
    ALL_LABELS,
    LABEL_COLUMN,
    ORDERS,
    candidate_ids,
    caption_value,
    filter_choices,
    n_pages,
    ordered_ids,
    page_containing,
    page_of,
)
from .prefetch import PagePrefetch
from .resources import get_layer_stats, get_reader, get_search, refresh_reader
from .session import Scheduler, pointer_cell, set_nodelay  # pointer_cell: serving hook
from .sweep_view import SweepView, has_sweeps
from .text import as_plain_markdown, client_message
from .topk import card_data, crop_png, search_hits
from .topk_view import TopKCards

log = logging.getLogger(__name__)

#: Colour maps offered for the overlays (names HoloViews resolves without matplotlib).
COLORMAPS: tuple[str, ...] = ("viridis", "inferno", "magma", "plasma", "cividis", "fire", "kbc", "coolwarm")
#: URL query parameter of each URL-mirrored app parameter: the whole view, so that a reloaded
#: (or shared) URL shows exactly what the user saw.
URL_PARAMETERS: dict[str, str] = {
    "store_key": "store", "layers_shown": "layers", "layer": "layer", "query": "query", "query_layer": "qlayer",
    "page": "page", "page_size": "page_size", "ncols": "ncols", "function": "function", "value_range": "range",
    "filter_by": "filter", "label": "label", "captions": "show", "order": "order", "seed": "seed", "tab": "tab"}
#: Server path: ms a hover's draw waits for superseding moves (see ExplorerApp._queue_hover).
HOVER_COALESCE_MS = 4
#: Average width of a caption character (10 px font): captions are cut to one tile's width.
CAPTION_PX_PER_CHAR = 6
#: Parameters that options (CLI, Python) may set at start and the store switch resets.
STATE_OPTIONS = ("layer", "query", "page", "function")

# (store, query, cards, index warning, how the hits were found)
TopKResult = tuple[str, Query, list[dict[str, Any]], "str | None", str]


def palette(name: str) -> list[str]:
    return list(process_cmap(name, 256))


def _held(method: Callable[..., None]) -> Callable[..., None]:
    """Run a method inside ``pn.io.hold``: rebuilt figures and their first data leave together.

    Unheld, the figures of a rebuild reached the browser in one message and their page images in
    a later one that BokehJS did not apply (seen on a sweep store with groups: Columns, Page size
    or a store switch left the grid without images until a reload).
    """
    @functools.wraps(method)
    def run(self: ExplorerApp, *args: Any, **kwargs: Any) -> None:
        with pn.io.hold(self._doc):
            method(self, *args, **kwargs)
    return run


#: How long after a page is shown its successor is read ahead.
PREFETCH_DELAY_MS = 400


def _prefetch_executor() -> ThreadPoolExecutor:
    return pn.state.as_cached("hoverlay-prefetch", ThreadPoolExecutor, max_workers=1,
                              thread_name_prefix="hoverlay-prefetch")


def _executor() -> ThreadPoolExecutor:
    return pn.state.as_cached("hoverlay-executor", ThreadPoolExecutor, max_workers=2,
                              thread_name_prefix="hoverlay-topk")


class ExplorerApp(param.Parameterized):
    """State and views of one browser session of the explorer."""

    # URL-mirrored. Plain strings/ints so that a bad URL value reaches our validation (and a
    # visible message) instead of failing inside param.
    layer = param.String(default="", doc="Layer whose patches the pointer snaps to.")
    query = param.String(default="", doc="Pinned query 'image,y,x' in `query_layer`; '' follows the pointer.")
    query_layer = param.String(default="", doc="""
        Layer whose cell the pinned query names ('': `layer`). A pin keeps its layer when the
        pointer snaps to another one, so its place in every layer never drifts.""")
    page = param.Integer(default=1, doc="1-based page number.")
    function = param.String(default="cosine", doc="Similarity function: cosine, dot or rbf.")

    store = param.Selector(default=None, objects=[], doc="Store URL.")
    layers_shown = param.ListSelector(default=[], objects=[], doc="Layers drawn side by side.")
    page_size = param.Integer(default=16, bounds=(1, 64))
    ncols = param.Integer(default=4, bounds=(1, 16), doc="Tiles per row in each layer's grid.")
    tile_px = param.Integer(default=110, bounds=(40, 400), doc="Displayed tile size in pixels.")
    filter_by = param.Selector(default=LABEL_COLUMN, objects=[LABEL_COLUMN], doc="""
        The table column the image filter looks at: the label, or a metadata column.""")
    label = param.Selector(default=ALL_LABELS, objects=[ALL_LABELS], doc="""
        The filter's value on ``filter_by`` (a value, a numeric range, or all).""")
    has_metadata = param.Boolean(default=False, doc="The store has metadata columns (shows their widgets).")
    captions = param.ListSelector(default=[], objects=[], doc="""
        Metadata columns shown on tiles and top-k cards, after the image id and label.""")
    order = param.Selector(default="index", objects=list(ORDERS))
    seed = param.Integer(default=0, doc="Seed of the random order ('Random sample' draws a new one).")
    cmap = param.Selector(default="viridis", objects=list(COLORMAPS))
    alpha = param.Number(default=0.6, bounds=(0.0, 1.0))
    value_range = param.Selector(default="auto", objects=["auto", "positive", "symmetric"], doc="""
        Fixed colour range: 'auto' is [0, 1] (cosine) for non-negative layers and [-1, 1] for signed
        ones; 'positive' always starts at 0 (negative similarities get the lowest colour).""")
    sigma_scale = param.Number(default=1.0, bounds=(0.05, 10.0), doc="RBF sigma / the layer's median norm.")
    k = param.Integer(default=8, bounds=(1, 64), doc="Number of dataset-wide neighbours shown.")
    live_topk = param.Boolean(default=True, doc="Search top-k whenever the pointer rests (else on pin / button).")
    topk_delay_ms = param.Integer(default=120, bounds=(0, None), doc="Pointer rest before the slow views update.")
    message = param.String(default="")
    store_key = param.String(default="", doc="The store's short name in the URL (never its server path).")
    tab = param.Integer(default=0, doc="Shown tab: 0 the explorer, then transform sweep / compare models.")
    browser_hover_budget = param.Integer(default=DEFAULT_BUDGET, bounds=(0, None), doc="""
        Largest page (bytes of float16 vectors and norms of the shown layers) whose hover maps the
        browser computes; larger pages, or 0, use the server path (a message per patch change).""")
    compare = param.Boolean(default=None, allow_None=True, doc="""
        Show a 'Compare models' tab for two stores with the same images (paired by content hash);
        None: whenever two of the given stores share images.""")

    def __init__(self, stores: Sequence[str], url: dict[str, Any] | None = None, **params: Any):
        urls = [str(s) for s in stores]
        if not urls:
            raise ValueError("the explorer needs at least one store")
        self._doc = pn.state.curdoc
        self._scheduler = Scheduler(self._doc)
        self._current: Query | None = None  # what the overlays show: pinned query or hovered patch
        self._drawn: Query | None = None
        self._drawn_query: tuple[Query | None, bool] | None = None  # what the browser path last got
        self._ranked: np.ndarray | None = None
        self._ranked_for: tuple[Query, int] | None = None  # the query and patch count of the ranking
        self._last_click = 0
        self._rest_timeout: Any = None
        self._topk_busy = False
        self._topk_pending = False
        self._topk_for: tuple[Query, int, str] | None = None
        self._figures: list[LayerFigure] = []
        self._query_figures: list[LayerFigure] = []
        self._prefetch = PagePrefetch(_prefetch_executor)
        self._pages_shown = 0  # pages this session has shown (read-ahead starts with the second)
        self._damaged_shown: set[int] = set()  # damaged images of the page, captioned as such
        self._hover_pending = False  # a server-path draw of the latest hover is scheduled
        self._updating = False
        self._quiet = False
        self._nodelay = False
        super().__init__()
        self.store_keys = store_keys(urls)
        self.param.store.objects = urls  # server paths: widgets show store_keys instead
        store = str(params.pop("store", urls[0]))
        if store not in urls:
            raise ValueError(f"store {store!r} is not one of {urls}")
        url = dict(url or {})
        problems: list[str] = []
        if url.get("store_key") not in (None, ""):
            key = str(url["store_key"])
            if key in self.store_keys.values():
                store = next(u for u, k in self.store_keys.items() if k == key)
            else:
                problems.append(f"unknown store {key!r}; choose from {sorted(self.store_keys.values())}")
        url.pop("store_key", None)
        with param.parameterized.discard_events(self):
            self.param.update(store=store, store_key=self.store_keys[store])
        self._open_store(store, initial={k: params.pop(k) for k in list(params) if k in STATE_OPTIONS})
        with param.parameterized.discard_events(self):
            if "filter_by" in params:  # before its values: they depend on the column
                self.param.update(filter_by=params.pop("filter_by"))
                self._filter_choices()
            self.param.update(**params)
        tab = url.pop("tab", None)
        problems += self._set_url_values(url)
        problems += self._check_layers_shown()
        self._reorder()
        self.controls: Controls = build_controls(self)
        # Rows that wrap: three layers of four 110 px columns are wider than a 1600 px window
        # beside the sidebar, and a Row would overflow it horizontally
        wrap = {"styles": {"flex-wrap": "wrap", "gap": "4px 12px"}, "sizing_mode": "stretch_width"}
        self._grid_row = pn.Row(**wrap)
        self._query_row = pn.Row(**wrap, visible=False)
        self._query_head = pn.pane.Markdown("**Query patch in every shown layer**: hover a patch",
                                            margin=(10, 10, 0, 10))
        self._topk_head = pn.pane.Markdown("**Top-k**: hover a patch", margin=(0, 10))
        self.topk_cards = TopKCards(on_open=self.open_image, sizing_mode="stretch_width")
        self.groups = GroupsOverlay(self)
        self.layout = pn.Row(self.controls.sidebar, pn.Column(margin=(0, 0, 0, 16), objects=[
            self.controls.message,
            self.controls.navigation,
            self.groups.panel,
            self._grid_row,
            self.groups.legend,
            self._query_head,
            self._query_row,
            self._topk_head,
            self.topk_cards,
        ]))
        self._rebuild()
        self._watch(self._on_state, [*STATE_OPTIONS, "query_layer"])
        self._watch(self._on_store, ["store"])
        self._watch(self._on_layout, ["layers_shown", "page_size", "ncols", "tile_px"])
        self._watch(self._on_paging, ["label", "order", "seed"])
        self._watch(self._on_filter_by, ["filter_by"])
        self._watch(self._on_captions, ["captions"])
        self._watch(self._on_colors, ["cmap", "sigma_scale", "value_range"])
        self._watch(self._on_alpha, ["alpha"])
        self._watch(lambda e: self.search_topk(), ["k"])
        self.param.watch(self._on_message, ["message"])
        self._watch(lambda *e: self._sync_widgets(), ["layer", "function", "query"])
        self._add_views(urls)  # after the watchers above: the views react to already-applied state
        if tab is not None:
            problems += self._set_url_values({"tab": tab})
        problems += self._on_tab()
        self._apply_state(initial=True, problems=problems)
        if self.order == "similar" and self._current is not None:  # a URL in similarity order
            self._on_paging()

    # ======================================================================= store & state
    def _watch(self, fn: Any, names: list[str]) -> None:
        """Watch parameters, except while :meth:`_set_quietly` sets several at once."""
        def guarded(*events: param.parameterized.Event) -> None:
            if not self._quiet:
                fn(*events)
        self.param.watch(guarded, names)

    def _set_quietly(self, **values: Any) -> None:
        """Set parameters together without the app's own reactions (the caller redraws once).

        Not ``discard_events``: that would also keep the sidebar's widgets on the old values (a
        store switch left *Layers shown* naming the previous store's layers, and the browser then
        sent those back as an invalid update).
        """
        quiet, self._quiet = self._quiet, True
        try:
            self.param.update(**values)
        finally:
            self._quiet = quiet

    def _open_store(self, url: str, initial: dict[str, Any] | None = None) -> None:
        # a new session sees images committed since the last one; damaged images become grey tiles
        self.reader = TolerantReader(refresh_reader(url))
        self.layer_names = self.reader.layers
        self._load_table()
        self.param.layers_shown.objects = list(self.layer_names)
        initial = initial or {}
        self._set_quietly(label=ALL_LABELS, filter_by=LABEL_COLUMN, captions=[],
                          layers_shown=self._default_layers(),
                          layer=str(initial.get("layer", self.layer_names[0])), page=int(initial.get("page", 1)),
                          function=str(initial.get("function", "cosine")), query=str(initial.get("query", "")))
        self.active_layer = self.layer_names[0]  # the validated `layer`
        self._current = self._drawn = None
        self._ranked = self._ranked_for = None
        self._topk_for = None
        self.engine = OverlayEngine(self.reader, [self.active_layer])

    def _load_table(self) -> None:
        table = self.reader.table()
        self._ok, self._labels = table.ok, table["label"]
        self._columns = {LABEL_COLUMN: self._labels, **table.metadata}
        self.param.filter_by.objects = list(self._columns)
        self.param.captions.objects = list(table.metadata)
        self.has_metadata = bool(table.metadata)
        if self.filter_by not in self._columns:
            self._set_quietly(filter_by=LABEL_COLUMN, label=ALL_LABELS)
        self._set_quietly(captions=[c for c in self.captions if c in table.metadata])
        self._filter_choices()

    def _filter_choices(self) -> None:
        """The filter's values for the column it looks at (of displayable images)."""
        column = self._columns[self.filter_by]
        self.param.label.objects = [ALL_LABELS, *filter_choices(column[self._ok])]

    def _on_filter_by(self, *events: param.parameterized.Event) -> None:
        self._filter_choices()
        self._set_quietly(label=ALL_LABELS)
        self._on_paging()

    def _on_captions(self, *events: param.parameterized.Event) -> None:
        ids = self._shown_images
        if ids is not None and len(ids):
            self.shared.set_labels(self.tile_captions(ids))
        self.topk_cards.set_extra(self.card_extra)

    def card_extra(self, image: int) -> list[str]:
        """``column: value`` lines of the chosen metadata columns, for a top-k card."""
        if not 0 <= image < len(self._labels):
            return []
        if image in self.reader.damaged:
            return ["unreadable (damaged in the store)"]
        return [f"{c}: {caption_value(self._columns[c][image])}" for c in self.captions if c in self._columns]

    def tile_captions(self, ids: np.ndarray) -> list[str]:
        """``#id label`` and the chosen metadata columns' values, for tiles and exports."""
        out = []
        for i in ids:
            if int(i) in self.reader.damaged:
                out.append(f"#{i} unreadable")
                continue
            parts = [f"#{i} {self._labels[i]}".rstrip()]
            parts += [caption_value(self._columns[c][i]) for c in self.captions if c in self._columns]
            text = " · ".join(p for p in parts if p)
            limit = max(8, self.tile_px // CAPTION_PX_PER_CHAR)  # one tile wide, 10 px font
            out.append(text if len(text) <= limit else text[:limit - 1] + "…")
        return out

    def on_commit(self) -> bool:
        """Catch up with the shared reader's newest commit, keeping layer, query and page.

        Called on the session's document lock by :mod:`explorer.reload` once the process's
        reader saw a new commit. What depends on the image count changes: the image list (label
        filter and order), the label choices, the page count and the query inputs' range; the
        page is redrawn. Returns False when this session already shows that commit.
        """
        if self.reader.n_images == len(self._ok):
            return False
        self._load_table()
        self._reorder()
        self._show_page()
        self._sync_widgets()
        return True

    def shown_layers(self) -> list[str]:
        """Layers drawn, in store order; always includes the layer the pointer snaps to."""
        chosen = set(self.layers_shown) | {self.active_layer}
        return [name for name in self.layer_names if name in chosen]

    def _say(self, text: str) -> None:
        log.info("explorer: %s", text)
        self.message = text

    @_held
    def _apply_state(self, initial: bool = False, problems: Sequence[str] = ()) -> None:
        """Validate the URL-mirrored parameters (bad ones: message + fallback), then redraw.

        ``problems`` are earlier failures (URL values of the wrong type) to report alongside.
        """
        if self._updating:
            return
        self._updating = True
        problems = list(problems)
        try:
            if self.layer not in self.layer_names:
                problems.append(f"unknown layer {self.layer!r}; this store has {self.layer_names}")
                self.layer = self.active_layer
            elif self.layer != self.active_layer:
                self._switch_layer(self.layer)
            if self.function not in SIMILARITY_FUNCTIONS:
                problems.append(f"unknown similarity function {self.function!r}; choose from "
                                f"{list(SIMILARITY_FUNCTIONS)}")
                self.function = "cosine"
            last = n_pages(len(self._order_ids), self.page_size)
            if not 1 <= self.page <= last:
                problems.append(f"page {self.page} does not exist; pages are 1 to {last}")
                self.page = min(max(1, self.page), last)
            if self.query_layer and self.query_layer not in self.layer_names:
                problems.append(f"unknown query layer {self.query_layer!r}; this store has {self.layer_names}")
                self.query, self.query_layer = "", ""
            if self.query:
                try:
                    image, y, x = parse_query_text(self.query)
                    self._current = self.engine.validate(Query(image, y, x, self.query_layer or self.active_layer))
                except (ValueError, StoreError) as exc:
                    problems.append(f"bad query: {exc}")
                    self.query, self.query_layer = "", ""
            elif self.query_layer:
                self.query_layer = ""
        finally:
            self._updating = False
        self._show_page()
        if problems:
            self._say("; ".join(problems))
        elif not initial:
            self.message = ""
        self._sync_widgets()
        if self._current is not None:
            self._show_layer_view(self._current)
            if self.query or self.live_topk:
                self._request_topk()

    def _switch_layer(self, layer: str) -> None:
        """Snap to another layer. A pinned query stays the cell of its own layer (re-expressing it in
        a coarser layer and back would move it: fine (12,7) -> coarse -> fine (14,6)); a hovered
        one moves to the cell of the new layer covering the same place."""
        old, self.active_layer = self.active_layer, layer
        if self._current is not None and self.query:
            if not self.query_layer:
                self.query_layer = self._current.layer or old
        elif self._current is not None:
            y, x = self.engine.mapped(self._current, layer)
            self._current = Query(self._current.image, y, x, layer)
        if self.shown_layers() != [f.layer for f in self._figures]:
            self._rebuild()

    def _on_state(self, *events: param.parameterized.Event) -> None:
        self._apply_state()

    @_held
    def _on_store(self, event: param.parameterized.Event) -> None:
        self._set_quietly(store_key=self.store_keys[event.new])
        # quiet until the new store's state is whole: the sidebar's widgets answer their new
        # options by writing values back (Layers shown), which would redraw with half of it
        quiet, self._quiet = self._quiet, True
        try:
            self._open_store(event.new)
            self._reorder()
            self.controls.layer_select.options = self.layer_names
        finally:
            self._quiet = quiet
        self._rebuild()
        self._apply_state(initial=True)
        if event.old is not None and set(self.reader.layers) != set(get_reader(event.old).layers):
            self._say(f"this store has other layers: showing {', '.join(self.shown_layers())}, "
                      f"the pointer snaps to {self.active_layer}")

    def _check_layers_shown(self) -> list[str]:
        """Layers shown must be layers of the store (param does not check a list it is given)."""
        unknown = [name for name in self.layers_shown if name not in self.layer_names]
        if not unknown and isinstance(self.layers_shown, list):
            return []
        self._set_quietly(layers_shown=self._default_layers())
        return [f"bad URL value layers={unknown!r}: this store has {self.layer_names}"]

    def _default_layers(self) -> list[str]:
        return list(self.layer_names if len(self.layer_names) <= 3 else self.layer_names[:1])

    def choose_store(self, key: str) -> None:
        """Switch to the store whose display name is ``key`` (the Store selector's value: a
        browser never sees server paths); an unknown name is ignored."""
        urls = [u for u, k in self.store_keys.items() if k == str(key)]
        if urls and urls[0] != self.store:
            self.store = urls[0]

    def _set_url_values(self, mapped: dict[str, Any]) -> list[str]:
        """Set URL values without the app's reactions; a value param refuses becomes a problem."""
        problems = []
        # the filter's column first: the values a filter may take depend on it
        for name, value in sorted(mapped.items(), key=lambda item: item[0] != "filter_by"):
            if value is None:
                continue
            try:
                self._set_quietly(**{name: value})
            except Exception:  # wrong type for the parameter, e.g. ?layer=3 -> int
                try:
                    self._set_quietly(**{name: str(value)})
                except Exception:
                    problems.append(f"bad URL value {URL_PARAMETERS.get(name, name)}={value!r}")
                    continue
            if name == "filter_by":
                self._filter_choices()
                if "label" not in mapped:
                    self._set_quietly(label=ALL_LABELS)
        return problems

    @_held
    def apply_url(self, mapped: dict[str, Any]) -> None:
        """Show the view a URL names (the browser's back / forward, an edited address).

        Values are set without reactions, the ones param refuses collected, then the page is
        redrawn once and the whole state validated, so a URL with several bad values reports all
        of them in one message and no value undoes another (a label filter resetting the page).
        """
        mapped = {k: v for k, v in mapped.items() if k in URL_PARAMETERS and not _same(v, getattr(self, k))}
        if not mapped:
            return  # the URL says what is shown (e.g. the browser reporting the address it opened)
        layout = {"store_key", "layers_shown", "layer", "page_size", "ncols"} & set(mapped)
        problems = []
        key = mapped.pop("store_key", None)
        if key not in (None, "", self.store_key):
            urls = [u for u, k in self.store_keys.items() if k == str(key)]
            if urls:
                self.store = urls[0]
            else:
                problems.append(f"unknown store {key!r}; choose from {sorted(self.store_keys.values())}")
        problems += self._set_url_values(mapped)
        problems += self._check_layers_shown()
        problems += self._on_tab()
        self._reorder()
        if layout:
            self._rebuild()
        self._apply_state(problems=problems)


    # ============================================================================= paging
    def _reorder(self) -> None:
        cand = candidate_ids(self._ok, self._columns[self.filter_by], self.label)
        self._order_ids = ordered_ids(cand, self.order, self.seed, self._ranked)

    def page_ids(self) -> np.ndarray:
        """Image ids on the current page."""
        return page_of(self._order_ids, self.page - 1, self.page_size)

    def go(self, delta: int) -> None:
        """Previous / next page."""
        last = n_pages(len(self._order_ids), self.page_size)
        self.page = min(max(1, self.page + delta), last)

    def random_sample(self) -> None:
        """A new random page of images (a fresh seeded shuffle)."""
        self.param.update(order="random", seed=self.seed + 1)

    def sort_by_similarity(self) -> None:
        """Order the images by their best patch's similarity to the current query."""
        self._rank_similar()
        if self.order != "similar":
            self.order = "similar"
        else:
            self._on_paging()

    @_held
    def _on_paging(self, *events: param.parameterized.Event) -> None:
        if self.order == "similar" and self._ranked is None:
            self._rank_similar()
        self._reorder()
        if self.page != 1:
            self.page = 1  # -> _apply_state -> _show_page
        else:
            self._show_page()

    def _rank_similar(self) -> None:
        """Whole-store search from the current query, aggregated to images."""
        if self._current is None:
            self._say("hover or pin a query before sorting by similarity")
            self._ranked = np.empty(0, dtype=np.int64)
            return
        q = self._current
        qv = self.engine.query_vectors(q, [q.layer])[q.layer]
        g = self.reader.geometry(q.layer)
        k = min(self.reader.n_images * g.patches_per_image, max(400, 20 * self.page_size))
        top = get_search(self.store, q.layer).search(qv.unit, k)
        self._ranked = images_by_best_patch(top.ids, g.patches_per_image)
        self._ranked_for = (q, k)

    # ============================================================================== views
    def _clim(self, layer: str) -> tuple[float, float]:
        st = get_layer_stats(self.store, layer)
        nonnegative = {"auto": st.nonnegative, "positive": True, "symmetric": False}[self.value_range]
        function = self.function if self.function in SIMILARITY_FUNCTIONS else "cosine"  # not yet validated
        return color_range(function, nonnegative=nonnegative, norm_hi=st.norm_hi)

    def _sigmas(self) -> dict[str, float]:
        return {name: get_layer_stats(self.store, name).norm_median * self.sigma_scale
                for name in self.shown_layers()}

    def _title(self, layer: str) -> str:
        g = self.reader.geometry(layer)
        mark = "  ◆ pointer snaps here" if layer == self.active_layer else ""
        return f"{layer}  {g.height}×{g.width}×{g.dim}{mark}"

    def _hw(self, layer: str) -> tuple[int, int]:
        g = self.reader.geometry(layer)
        return g.height, g.width

    def _rebuild(self) -> None:
        """(Re)build the figures: at start, and when the shown layers or the grid's shape change."""
        shown = self.shown_layers()
        self.engine.set_layers(shown)
        s = self.reader.image_size
        hws = {name: self._hw(name) for name in shown}
        self.specs = grid_specs(hws, self.page_size, min(self.ncols, self.page_size), s, self.tile_px,
                                label_band=0.16)
        self.shared = SharedSources.create("grid")
        self.shared.pointer.on_change("data", self._on_pointer)
        self.qspecs = grid_specs(hws, 1, 1, s, max(self.tile_px, 150))
        self.qshared = SharedSources.create("query")
        self.mapped_source = ColumnDataSource(empty_columns(OUTLINE_COLUMNS), name="query-mapped")
        pal = palette(self.cmap)
        self._figures, self._query_figures = [], []
        for i, name in enumerate(shown):
            clim, title = self._clim(name), self._title(name)
            self._figures.append(LayerFigure(name, self.specs[name], self.shared, index=i, palette=pal,
                                             clim=clim, alpha=self.alpha, title=title, hover=False))
        self.browser = BrowserHover(self._figures, self.shared)
        self.path = HoverPath(False, 0, self.browser_hover_budget)
        # groups glyphs join the figures before the figures join the page: models added to a
        # figure already in the document after the same hold reached the browser unknown
        self.groups.attach(self._figures)
        self._grid_row.objects = [pn.pane.Bokeh(f.plot) for f in self._figures]
        self._query_row.objects = []  # its figures are built with the first query (a third of a page's start)
        self._query_row.visible = False  # until there is a query: no empty colour bars
        self._query_head.object = "**Query patch in every shown layer**: hover a patch"
        self._shown_images = np.empty(0, dtype=np.int64)
        self._query_image = -1
        self._drawn = None
        self._drawn_query = None

    def _show_page(self) -> None:
        """Send the page's images (once per page), colour ranges, then the current overlays."""
        ids = self.page_ids()
        self.engine.set_page(ids)
        with pn.io.hold(self._doc):
            if not np.array_equal(ids, self._shown_images):
                s = self.reader.image_size
                layers = list(self.browser.vectors)
                ahead = self._prefetch.take(self.reader, ids, layers)
                pixels = (ahead.pixels if ahead is not None else self.reader.pixels(ids)) if ids.size \
                    else np.zeros((0, s, s, 3), np.uint8)
                self.shared.set_images(self.specs, pixels, self.tile_captions(ids))
                self._shown_images = ids
                self.groups.show_page(ids)
                self._send_page_vectors(ids, ahead.vectors if ahead is not None else None)
                self._mark_damaged()
                # read the next page while this one is looked at (browser path: with its vectors),
                # once this one is out (on 2 cores a read beside the page's own work slowed it
                # ~0.5 s) and only in a session that pages (at 50 sessions opening at once, reading
                # every session's second page saturated the server)
                self._pages_shown += 1
                if self._pages_shown > 1:
                    nxt = page_of(self._order_ids, self.page, self.page_size)
                    later = layers if self.path.browser else []
                    self._scheduler.later(lambda reader=self.reader, nxt=nxt, layers=later:
                                          self._prefetch.request(reader, nxt, layers), PREFETCH_DELAY_MS)
            self._send_config()
            for fig in self._figures + self._query_figures:
                fig.set_colors(clim=self._clim(fig.layer))  # the similarity function may have changed
                fig.colorbar.title = self.function
            for fig in self._figures:
                fig.title.text = self._title(fig.layer)
            self._show_overlays(self._current, force=True)
            self._show_pin()
        total = len(self._order_ids)
        self.controls.page_info.object = (f"page **{self.page}** / {n_pages(total, self.page_size)} · "
                                          f"{total} images{self._order_note()}  \n{self.path.describe()}")

    def _order_note(self) -> str:
        """How the similarity order was found, when it is the order shown."""
        if self.order != "similar" or self._ranked is None or self._ranked_for is None:
            return ""
        (q, k), ranked = self._ranked_for, int(np.isin(self._order_ids, self._ranked).sum())
        rest = len(self._order_ids) - ranked
        note = (f" · by similarity to #{q.image} ({q.y},{q.x}) in {q.layer}: {ranked} ranked by their best "
                f"patch among the {k} nearest patches")
        return note + (f", {rest} more follow in store order" if rest else "")

    def _send_page_vectors(self, ids: np.ndarray,
                           ahead: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """The browser path's page vectors (once per page; ``ahead``: already read), or none when
        the page is over budget."""
        geometries = {}
        for name in self.browser.vectors:  # the figures' layers
            g = self.reader.geometry(name)
            geometries[name] = (g.height, g.width, g.dim)
        self.path = choose_path(len(ids), geometries, self.browser_hover_budget)
        vectors = None
        if self.path.browser:
            vectors = {name: (ahead[name] if ahead is not None and name in ahead
                              else (self.reader.vectors(name, ids), self.reader.norms(name, ids)))
                       if ids.size else (np.zeros(0, np.float16), np.zeros(0, np.float32))
                       for name in geometries}
        self.browser.set_page(ids, vectors)
        self._drawn_query = None

    def _send_config(self) -> None:
        """Grids, snapping layer, page size and — for the browser path — function, sigmas, timing."""
        shown = list(self.specs)
        extra = BrowserHover.config_columns(
            self.path, shown, {n: self.reader.geometry(n).dim for n in shown},
            {n: (*self.specs[n].gap_cells, self.specs[n].band_cells) for n in shown},
            self.function if self.function in SIMILARITY_FUNCTIONS else "cosine",
            self._sigmas(), self.topk_delay_ms)
        self.shared.set_config(self.specs, self.active_layer, len(self._shown_images), extra)

    def _show_overlays(self, query: Query | None, force: bool = False) -> None:
        """The hover hot path: every shown layer's overlays for ``query``, one source per layer."""
        if query == self._drawn and not force:
            return
        self._drawn = query
        n = len(self._shown_images)
        if self.path.browser:  # the browser draws: it needs the query only when it cannot know it
            key = (query, bool(self.query))
            if key != self._drawn_query:
                self._drawn_query = key
                self.browser.set_query(self.engine.query_vectors(query, self.shown_layers())
                                       if query is not None else None, pinned=bool(self.query))
            return
        maps = self.engine.page_maps(query, self.function, self._sigmas()) if query is not None else {}
        self._mark_damaged()
        with pn.io.hold(self._doc):
            for fig in self._figures:
                fig.set_maps(maps.get(fig.layer), n)

    def _mark_damaged(self) -> None:
        """Caption the page's tiles "unreadable" as soon as a read finds them damaged (the
        vectors of a layer are read after the captions went out)."""
        ids = self._shown_images
        found = self.reader.damaged & set(ids.tolist()) if ids is not None else set()
        if found != self._damaged_shown:
            self._damaged_shown = found
            self.shared.set_labels(self.tile_captions(ids))

    def _build_query_figures(self) -> None:
        """The query-patch view's figures, one tile each: built when first needed, not per page open."""
        pal = palette(self.cmap)
        self._query_figures = [
            LayerFigure(fig.layer, self.qspecs[fig.layer], self.qshared, index=i, palette=pal,
                        clim=self._clim(fig.layer), alpha=self.alpha, title=fig.layer, prefix="query",
                        hover=False, outline_source=self.mapped_source)
            for i, fig in enumerate(self._figures)]
        for fig in self._query_figures:
            fig.colorbar.title = self.function
        self._query_row.objects = [pn.pane.Bokeh(f.plot) for f in self._query_figures]

    def _show_layer_view(self, query: Query) -> None:
        """The query image in every shown layer, its self-similarity, the mapped patch outlined."""
        with pn.io.hold(self._doc):
            if not self._query_figures:
                self._build_query_figures()
            if query.image != self._query_image:
                self.qshared.set_images(self.qspecs, self.reader.pixels(np.array([query.image])))
                self._query_image = query.image
            maps = self.engine.image_maps(query.image, query, self.function, self._sigmas())
            rows: dict[str, list] = empty_columns(OUTLINE_COLUMNS)
            label = self._labels[query.image]
            for fig in self._query_figures:
                fig.set_maps(maps[fig.layer], 1)
                y, x = self.engine.mapped(query, fig.layer)
                for col, v in (("fig", fig.layer), ("tile", 0), ("y", y), ("x", x),
                               *fig.spec.outline(0, y, x).items()):
                    rows[col].append(v)
                fig.title.text = f"{fig.layer} ({y},{x})"  # short: the figure is one tile wide
            self.mapped_source.data = rows
            self._query_head.object = (f"**Query patch in every shown layer**: #{query.image} "
                                       f"{as_plain_markdown(str(label))} "
                                       f"(outline: the cell it maps to in each layer)")
            self._query_row.visible = True

    def _show_pin(self) -> None:
        """Outline the pinned query on its tile in every layer, if its image is on the page."""
        rows: dict[str, list] = empty_columns(OUTLINE_COLUMNS)
        q = self._current if self.query else None
        tiles = np.flatnonzero(self._shown_images == q.image) if q is not None else np.empty(0)
        if q is not None and tiles.size:
            t = int(tiles[0])
            for fig in self._figures:
                y, x = self.engine.mapped(q, fig.layer)
                for col, v in (("fig", fig.layer), ("tile", t), ("y", y), ("x", x),
                               *fig.spec.outline(t, y, x).items()):
                    rows[col].append(v)
        if rows != dict(self.shared.pin.data):
            self.shared.pin.data = rows

    def _on_colors(self, *events: param.parameterized.Event) -> None:
        pal = palette(self.cmap)
        with pn.io.hold(self._doc):
            for fig in self._figures + self._query_figures:
                fig.set_colors(pal, self._clim(fig.layer))
            self._send_config()
            self._show_overlays(self._current, force=True)
            if self._current is not None:
                self._show_layer_view(self._current)

    def _on_alpha(self, event: param.parameterized.Event) -> None:
        with pn.io.hold(self._doc):
            for fig in self._figures + self._query_figures:
                fig.set_alpha(event.new)

    @_held
    def _on_layout(self, *events: param.parameterized.Event) -> None:
        self._rebuild()
        self._apply_state()

    def _add_views(self, urls: list[str]) -> None:
        """Tabs for the case studies the stores support: transform sweeps, comparing models."""
        tabs: list[tuple[str, pn.viewable.Viewable]] = []
        self.sweep_view = SweepView(self) if has_sweeps(self) else None
        if self.sweep_view is not None:
            tabs.append(("Transform sweep", self.sweep_view.layout))
        self.compare_view = None
        if self.compare is not False and len(urls) > 1:
            pair = find_compare_pair(urls)
            if pair is not None:
                self.compare_view = CompareView(self, *pair)
                tabs.append(("Compare models", self.compare_view.layout))
            elif self.compare:
                names = ", ".join(self.store_keys[u] for u in urls)
                self._say(f"no two of the stores {names} share images (content hashes): nothing to compare")
        elif self.compare:
            self._say("comparing models needs two stores built from the same images")
        if tabs:
            main = self.layout[1]
            main.margin = (0, 0, 0, 0)
            self.tabs = pn.Tabs(("Explorer", main), *tabs, dynamic=False, margin=(0, 0, 0, 16))
            self.layout[1] = self.tabs
            views = [None, *(v for v in (self.sweep_view, self.compare_view) if v is not None)]
            # a view builds its figures when its tab is first shown, not at session start
            self.tabs.param.watch(lambda e: views[e.new] and views[e.new].activate(), "active")
            self.tabs.param.watch(lambda e: setattr(self, "tab", e.new), "active")
        self._watch(lambda e: self._on_tab(), ["tab"])

    def _on_tab(self) -> list[str]:
        """Show the tab ``tab`` names (0 when there is no such tab: the problem is returned); the
        sidebar only on the Explorer tab, where its controls act (elsewhere they would do nothing)."""
        tabs = getattr(self, "tabs", None)
        n = len(tabs) if tabs is not None else 1
        problems = []
        if not 0 <= self.tab < n:
            problems.append(f"tab {self.tab} does not exist; tabs are 0 to {n - 1}")
            self._set_quietly(tab=0)
        if tabs is not None and tabs.active != self.tab:
            tabs.active = self.tab
        self.controls.sidebar.visible = self.tab == 0
        return problems

    # ============================================================================ pointer
    def _on_pointer(self, attr: str, old: Any, new: dict[str, list]) -> None:
        """The browser reports a new patch under the pointer, or a click (pin / unpin)."""
        if not self._nodelay:
            self._nodelay = True
            set_nodelay(self._doc)
        if pointer_cell(new, len(self._shown_images), self._hw(self.active_layer)) is None:  # serving hook
            return  # (explorer/session.py) a pointer row no page can write: bad types, off the page/grid
        if not new.get("tile") or new["tile"][0] < 0:
            return
        tile, y, x, click = (int(new[c][0]) for c in ("tile", "y", "x", "click"))
        if tile >= len(self._shown_images):
            return
        hovered = Query(int(self._shown_images[tile]), y, x, self.active_layer)
        if click != self._last_click:
            self._last_click = click
            if self.query:
                self.unpin(hovered)
            else:
                self._pin_query(hovered)
            return
        if not self.query:
            self._current = hovered
            if self.path.browser:  # the browser already waited for the pointer to rest
                self._show_overlays(hovered)
                self._scheduler.cancel(self._rest_timeout)
                self._rest_timeout = self._scheduler.later(self._on_rest, 0)
            else:
                self._queue_hover()
                self._after_rest()

    def _queue_hover(self) -> None:
        """Draw the overlays of the latest hovered patch once the loop gets to it: moves that
        arrive meanwhile (a loaded server reads a session's queued moves first) replace the
        pending one, so a burst costs one draw and the latest move wins, however busy the loop."""
        if self._hover_pending:
            return
        self._hover_pending = True
        self._scheduler.soon(self._draw_latest_hover, HOVER_COALESCE_MS)

    def _draw_latest_hover(self) -> None:
        self._hover_pending = False
        if not self.query and self._current is not None:
            self._show_overlays(self._current)

    def pin(self, image: int, y: int, x: int) -> None:
        """Pin the query at (image, y, x) of the active layer (numeric inputs, notebooks)."""
        self._pin_query(Query(int(image), int(y), int(x), self.active_layer))

    def _pin_query(self, query: Query) -> None:
        """Pin through the URL-mirrored parameters: the cell, and the layer it is a cell of."""
        self._set_quietly(query_layer=query.layer)
        self.query = query.as_text()

    def unpin(self, follow: Query | None = None) -> None:
        """Let the overlays follow the pointer again (starting at ``follow`` if given)."""
        self._set_quietly(query_layer="")
        self.query = ""
        if follow is not None:
            self._current = follow
            self._show_overlays(follow)
            self._after_rest()

    # ============================================================== after the pointer rests
    def _after_rest(self) -> None:
        """(Re)start the rest timer; the layer view and top-k update when it fires."""
        self._scheduler.cancel(self._rest_timeout)
        self._rest_timeout = None
        self._rest_timeout = self._scheduler.later(self._on_rest, self.topk_delay_ms)

    def _on_rest(self) -> None:
        self._rest_timeout = None
        if self._current is None:
            return
        self._show_layer_view(self._current)
        if self.live_topk:
            self._request_topk()

    def search_topk(self) -> None:
        """Search top-k for the current query now (button, k changed)."""
        self._request_topk(force=True)

    def _request_topk(self, force: bool = False) -> None:
        """At most one search in flight per session; a request meanwhile runs when it ends."""
        query = self._current
        if query is None:
            return
        key = (query, self.k, self.store)
        if key == self._topk_for and not force:
            return
        if self._topk_busy:
            self._topk_pending = True
            return
        self._topk_for = key
        self._topk_busy = True
        qv = self.engine.query_vectors(query, [query.layer])[query.layer]  # the engine stays on this thread
        # The store and reader are bound now: a store switch while this runs must not pair the
        # old query vector with the new store's index.
        self._scheduler.in_thread(_executor(), self._compute_topk, self.store, self.reader, query, qv, self.k,
                                  done=self._finish_topk)

    @staticmethod
    def _compute_topk(store: str, reader: StoreReader, query: Query, qv: QueryVector, k: int) -> TopKResult:
        """Runs in a worker thread: search, then crops (only the shared reader and index)."""
        search = get_search(store, query.layer)
        hits, how = search_hits(search, qv, k)
        cards = [card_data(h, crop_png(reader, query.layer, h)) for h in hits]
        return store, query, cards, search.warning, how

    def _finish_topk(self, result: TopKResult | None, error: BaseException | None) -> None:
        self._topk_busy = False
        if error is not None:  # a failed search must not break hovering
            log.error("top-k search failed", exc_info=error)
            self._say(f"top-k search failed: {client_message(error)}")
        pending, self._topk_pending = self._topk_pending, False
        if result is not None and result[0] != self.store:
            result, pending = None, True  # hits of a store this session has left: never shown
        if pending and (result is None or result[1] != self._current):
            self._request_topk()  # the pointer (or the store) moved on: search where it is now
            return
        if result is not None:
            self._show_topk(result)

    def _show_topk(self, result: TopKResult) -> None:
        _, query, cards, warning, how = result
        head = (f"**Top {len(cards)}** patches of the store closest to #{query.image} "
                f"({query.y},{query.x}) in `{query.layer}` — cosine, {how}")
        if warning:
            head += f"  \n⚠ {warning}"
        self._topk_head.object = head
        self.topk_cards.show([{**c, "extra": self.card_extra(int(c["image"]))} for c in cards])

    def open_image(self, image: int) -> None:
        """Bring an image (a top-k hit's) onto the page, clearing filters that hide it."""
        page = page_containing(self._order_ids, image, self.page_size)
        if page is None:
            self._set_quietly(label=ALL_LABELS, order="index")
            self._reorder()
            page = page_containing(self._order_ids, image, self.page_size) or 0
        if self.page != page + 1:
            self.page = page + 1
        else:
            self._show_page()

    # ============================================================================= export
    def export_png(self) -> io.BytesIO:
        """The current page as shown, as a PNG (what the download button serves): overlays, colour
        bars, the query's cell outlined on its tile, and for the groups overlay its colours and legend."""
        ids = self._shown_images
        pixels = self.reader.pixels(ids) if ids.size else np.zeros((0, 1, 1, 3), np.uint8)
        shown = [f.layer for f in self._figures]
        q = self._current
        maps = self.engine.page_maps(q, self.function, self._sigmas()) if q is not None else {}
        tile = np.flatnonzero(ids == q.image) if q is not None else np.empty(0)
        groups, legend = self.groups.export(ids)
        layers = {}
        for name in shown:
            cell = None
            if q is not None and tile.size:
                cell = (int(tile[0]), *self.engine.mapped(q, name))
            layers[name] = ExportLayer(maps.get(name), self._clim(name), self._hw(name), cell, groups.get(name))
        function = self.function if self.function in SIMILARITY_FUNCTIONS else "cosine"
        png = compose_grid_png(pixels, layers, palette(self.cmap), self.alpha, min(self.ncols, self.page_size),
                               self.tile_captions(ids), function=function,
                               group_colors=GROUP_PALETTE, legend=legend)
        return io.BytesIO(png)

    # ================================================================== widgets & session
    def _sync_widgets(self) -> None:
        c = self.controls
        c.layer_select.value = self.active_layer
        if self.function in SIMILARITY_FUNCTIONS:
            c.function_select.value = self.function
        pinned = bool(self.query) and self._current is not None
        h, w = self._hw(self._current.layer if pinned and self._current is not None else self.active_layer)
        qimage, qy, qx = c.query_inputs
        qimage.end, qy.end, qx.end = max(0, self.reader.n_images - 1), h - 1, w - 1
        if self.query and self._current is not None:
            c.pin_state.object = (f"pinned: #{self._current.image} ({self._current.y},{self._current.x}) "
                                  f"in {self._current.layer}")
            qimage.value, qy.value, qx.value = self._current.image, self._current.y, self._current.x
        else:
            c.pin_state.object = "following the pointer"

    def _on_message(self, event: param.parameterized.Event) -> None:
        # messages quote client values (bad URL parameters, refused updates): shown as plain text
        self.controls.message.object = as_plain_markdown(event.new)
        self.controls.message.visible = bool(event.new)

    def on_load(self) -> None:
        """Once the browser is connected: send small websocket messages without Nagle delay, and
        give the browser path its query again (the page's first data fires no change event)."""
        self._nodelay = True
        set_nodelay(self._doc)
        if self.path.browser and self._current is not None:
            self._drawn_query = None
            self._show_overlays(self._current, force=True)


def _same(url_value: Any, value: Any) -> bool:
    """Whether a URL value names the current value (the URL carries ``2`` and ``"2"`` alike)."""
    if url_value == value:
        return True
    try:
        return json.dumps(url_value) == json.dumps(value) or str(url_value) == str(value)
    except (TypeError, ValueError):
        return False


def store_keys(urls: Sequence[str]) -> dict[str, str]:
    """Short unique names of the stores for the URL: the last path part, numbered if repeated."""
    out: dict[str, str] = {}
    for url in urls:
        base = str(url).rstrip("/").rsplit("/", 1)[-1] or "store"
        key, n = base, 2
        while key in out.values():
            key, n = f"{base}-{n}", n + 1
        out[url] = key
    return out


class UrlState(param.Parameterized):
    """The view as the URL holds it, between Panel's location sync and the app.

    Its parameters take any value, so that whatever a URL holds reaches
    :meth:`ExplorerApp.apply_url` (validation, one message for all bad values) instead of failing
    inside param; and the app applies a changed URL in one step, so that no value's reaction
    undoes another's (a label filter resetting the page to 1).
    """

    def __init__(self, **params: Any):
        for name in URL_PARAMETERS:
            self.param.add_parameter(name, param.Parameter(default=None))
        super().__init__(**params)
        self._app: ExplorerApp | None = None
        self._location: Any = None
        self._opened: dict[str, Any] | None = None
        self._writing = False

    def values(self) -> dict[str, Any]:
        """The URL's values by app parameter name (None: not in the URL)."""
        return {name: getattr(self, name) for name in URL_PARAMETERS}

    def follow(self, app: ExplorerApp, location: Any) -> None:
        """Mirror the app's state from now on, and hand URL changes to it."""
        self._app, self._location = app, location
        self._opened = self.values()  # the address the page was opened with
        self._write(app)
        app.param.watch(lambda *e: self._write(app), list(URL_PARAMETERS))
        self.param.watch(self._read, list(URL_PARAMETERS))

    def publish(self) -> None:
        """Write the whole view into the address bar (once the page is connected)."""
        if self._app is None or self._location is None:
            return
        query = {}
        for name, key in URL_PARAMETERS.items():
            value = getattr(self._app, name)
            query[key] = value if isinstance(value, str) else json.dumps(value)
        self._writing = True
        try:
            self._location.update_query(**query)
        finally:
            self._writing = False

    def _write(self, app: ExplorerApp) -> None:
        self._writing = True
        try:
            self.param.update(**{name: getattr(app, name) for name in URL_PARAMETERS})
        finally:
            self._writing = False

    def _read(self, *events: param.parameterized.Event) -> None:
        if self._writing or self._app is None:
            return
        values = {e.name: e.new for e in events}
        opened, self._opened = self._opened, None
        if opened is not None and all(_same(v, opened.get(k)) for k, v in values.items()):
            # the page reporting the address it was opened with, after the app already applied
            # (and corrected) it: write the view back instead of applying it a second time
            self.publish()
            return
        self._app.apply_url(values)


def create_app(stores: Sequence[str] | str, **options: Any) -> pn.viewable.Viewable:
    """Build one session's explorer as a servable Panel layout.

    ``stores`` is one store URL or a list (a selector appears for several). ``options`` set
    :class:`ExplorerApp` parameters (``layer``, ``page_size``, ``k``, ``cmap``, ...). In a server
    session the whole view is mirrored in the URL (:data:`URL_PARAMETERS`), and a URL's values
    override the options.
    The app object is available as ``layout.app``.
    """
    urls = [stores] if isinstance(stores, str) else list(stores)
    doc = pn.state.curdoc
    location = pn.state.location if doc is not None and doc.session_context is not None else None
    if location is None:
        app = ExplorerApp(urls, **options)
    else:
        url_state = UrlState()
        location.sync(url_state, URL_PARAMETERS)  # the URL's values, untyped, into url_state
        app = ExplorerApp(urls, url=url_state.values(), **options)
        url_state.follow(app, location)
        pn.state.onload(url_state.publish)
    pn.state.onload(app.on_load)  # a server session and a notebook cell alike
    layout = app.layout
    layout.app = app  # type: ignore[attr-defined]
    return layout
