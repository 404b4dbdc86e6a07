"""One browser session's explorer state: what is shown, validated, and nothing about how.

:class:`ExplorerState` is the single ``param.Parameterized`` object every view holds (as a
``param.ClassSelector``) and reacts to with ``@param.depends``. It owns the store, its table and
the image order, and it validates every value a client can send (URL, widgets, pointer) — a bad
one becomes a message and a fallback, never an exception in a view. It never calls a view and
imports no Bokeh: a test drives it with plain attribute sets.

Two kinds of parameters:

- **inputs**, set by widgets, the URL or Python (``layer``, ``query``, ``page``, ``function``,
  ``layers_shown``, ``page_size`` ...): plain types, so a bad URL value reaches validation;
- **outputs**, set only here after validation, which views depend on:
  ``view`` (a :class:`PageView`: the store, layers, page and grid shape to draw),
  ``current`` (the query the overlays show: the pinned one, or the hovered patch) and
  ``settled`` (the query once the pointer rested or was pinned: what the slow views show).
  An output is published in one ``param.update``, so a view depending on several of them runs
  once per change, on a state that is whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import param

from hoverlay.options import ByteSize
from hoverlay.stores import StoreError

from .damage import TolerantReader
from .engine import OverlayEngine, Query, parse_query_text
from .kernels import (
    SIMILARITY_FUNCTIONS,
    PageBlock,
    QueryVector,
    color_range,
    images_by_best_patch,
    page_block,
)
from .options import DEFAULT_BROWSER_HOVER_BUDGET
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
from .resources import get_layer_stats, get_reader, get_search, refresh_reader

log = logging.getLogger(__name__)

#: Colour maps offered for the overlays (names HoloViews resolves without matplotlib).
COLORMAPS: tuple[str, ...] = ("viridis", "inferno", "magma", "plasma", "cividis", "fire", "kbc", "coolwarm")
#: URL query parameter of each URL-mirrored state parameter: the whole view, so that a reloaded
#: (or shared) URL shows exactly what the user saw.
URL_PARAMETERS: dict[str, str] = {
    "store_key": "store", "layers_shown": "layers", "layer": "layer", "query": "query", "query_layer": "qlayer",
    "page": "page", "page_size": "page_size", "ncols": "ncols", "function": "function", "value_range": "range",
    "filter_by": "filter", "label": "label", "captions": "show", "order": "order", "seed": "seed", "tab": "tab",
    "query_b": "qb", "query_b_layer": "qblayer"}
#: Parameters that options (CLI, Python) may set at start and the store switch resets.
STATE_OPTIONS = ("layer", "query", "page", "function")
#: Average width of a caption character (10 px font): captions are cut to one tile's width.
CAPTION_PX_PER_CHAR = 6
#: Outputs: set only by the state itself (options and URLs cannot name them).
OUTPUTS = ("view", "current", "settled", "pinned", "second", "search_now", "upload")


@dataclass(frozen=True)
class PageView:
    """What the main grid shows, validated: views draw exactly this."""

    store: str
    layers: tuple[str, ...]  # shown, in store order; always includes active_layer
    active_layer: str  # the layer the pointer snaps to
    ids: tuple[int, ...]  # image ids of the page
    page: int
    pages: int
    total: int  # images in the current order (after the filter)
    function: str  # a valid similarity function
    page_size: int
    ncols: int
    tile_px: int
    note: str = ""  # how the order was found (similarity order)

    @property
    def page_ids(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=np.int64)

    @property
    def grid(self) -> tuple[Any, ...]:
        """What the figures are built for: a change rebuilds them, anything else only redraws."""
        return self.store, self.layers, self.page_size, self.ncols, self.tile_px

    def describe(self) -> str:
        return f"page **{self.page}** / {self.pages} · {self.total} images{self.note}"


def same_value(url_value: Any, value: Any) -> bool:
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


class ExplorerState(param.Parameterized):
    """The state of one explorer session (see the module docstring for inputs and outputs)."""

    # ------------------------------------------------------------------ inputs (URL-mirrored)
    # Plain strings/ints so that a bad URL value reaches validation (and a visible message)
    # instead of failing inside param.
    layer = param.String(default="", doc="Layer whose patches the pointer snaps to.")
    query = param.String(default="", doc="Pinned query 'image,y,x' in `query_layer`; '' follows the pointer.")
    query_layer = param.String(default="", doc="""
        Layer whose cell the pinned query names ('': `layer`). A pin keeps its layer when the
        pointer snaps to another one, so its place in every layer never drifts.""")
    query_b = param.String(default="", doc="""
        A second pinned query 'image,y,x' in `query_b_layer` ('' none): the page then shows the
        maps of both pinned queries side by side, their difference, and both top-k lists.""")
    query_b_layer = param.String(default="", doc="Layer whose cell `query_b` names.")
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
    message = param.String(default="", doc="What the session tells the user (shown as plain text).")
    store_key = param.String(default="", doc="The store's short name in the URL (never its server path).")
    tab = param.Integer(default=0, doc="Shown tab: 0 the explorer, then transform sweep / compare models.")
    browser_hover_budget = param.Integer(default=ByteSize().from_value(DEFAULT_BROWSER_HOVER_BUDGET), bounds=(0, None), doc="""
        Largest page (bytes of float16 vectors and norms of the shown layers) whose hover maps the
        browser computes; larger pages, or 0, use the server path (a message per patch change).""")
    compare = param.Boolean(default=None, allow_None=True, doc="""
        Show a 'Compare models' tab for two stores with the same images (paired by content hash);
        None: whenever two of the given stores share images.""")

    # ------------------------------------------------------------------------------ outputs
    view = param.ClassSelector(class_=PageView, default=None, allow_None=True, doc="The validated page.")
    current = param.ClassSelector(class_=Query, default=None, allow_None=True, doc="""
        The query the overlays show: the pinned one, else the hovered patch (None: none yet).""")
    settled = param.ClassSelector(class_=Query, default=None, allow_None=True, doc="""
        The query once the pointer rested or was pinned: the query-patch view and top-k show it.""")
    pinned = param.Boolean(default=False, doc="``current`` is a pinned query (not the pointer's).")
    second = param.ClassSelector(class_=Query, default=None, allow_None=True, doc="""
        The validated second pinned query B (None: none); A is ``current`` (pinned or hovered).""")
    search_now = param.Event(doc="Search top-k for the settled query now (button, k changed).")
    upload = param.Integer(default=0, doc="""
        Id of the image uploaded last (negative: not a store image; 0: none). Queries name its
        patches like a store image's; its vectors come from the store's own model.""")
    query_folders = param.List(default=[], item_type=str, doc="""
        Server folders whose images a client may name by path as a query (an allow-list; empty:
        uploads only). Never shown to the client.""")

    def __init__(self, stores: Sequence[str], url: dict[str, Any] | None = None,
                 hold: Callable[[], AbstractContextManager[Any]] | None = None, **params: Any):
        """``stores``: store URLs (the first is shown unless ``store`` names another); ``url``: the
        URL's untyped values by parameter name (validated, bad ones reported in ``message``);
        ``hold``: a context in which a change and every view's reaction run (the app passes
        ``pn.io.hold`` of its document, so they reach the browser as one message)."""
        urls = [str(s) for s in stores]
        if not urls:
            raise ValueError("the explorer needs at least one store")
        bad = sorted(set(params) & set(OUTPUTS))
        if bad:
            raise ValueError(f"{bad} are set by the explorer, not options")
        self._hold = hold or contextlib.nullcontext
        self._hovered: Query | None = None  # the last hovered (or pinned) query, before validation
        self._second: Query | None = None  # query B, validated
        #: images not in the store (uploads) by negative id: their blocks, pixels and names
        self.external: dict[int, dict[str, PageBlock]] = {}
        self._external_pixels: dict[int, np.ndarray] = {}
        self._external_names: dict[int, str] = {}
        self._next_upload = -1
        self._ranked: np.ndarray | None = None
        self._ranked_for: tuple[Query, int] | None = None
        self._n_tabs = 1
        self._updating = False
        self._quiet = False
        super().__init__()
        self.store_keys = store_keys(urls)
        self.param.store.objects = urls  # server paths: widgets show store_keys instead
        store = str(params.pop("store", urls[0]))
        if store not in urls:
            raise ValueError(f"store {store!r} is not one of {urls}")
        url = dict(url or {})
        self._problems: list[str] = []
        if url.get("store_key") not in (None, ""):
            key = str(url["store_key"])
            if key in self.store_keys.values():
                store = next(u for u, k in self.store_keys.items() if k == key)
            else:
                self._problems.append(f"unknown store {key!r}; choose from {sorted(self.store_keys.values())}")
        url.pop("store_key", None)
        self._set_quietly(store=store, store_key=self.store_keys[store])
        self._open_store(store, initial={k: params.pop(k) for k in list(params) if k in STATE_OPTIONS})
        if "filter_by" in params:  # before its values: they depend on the column
            self._set_quietly(filter_by=params.pop("filter_by"))
            self._filter_choices()
        self._set_quietly(**params)
        self._url_tab = url.pop("tab", None)
        self._problems += self._set_url_values(url)
        self._problems += self._check_layers_shown()
        self._reorder()
        self._watch(self._apply_state, [*STATE_OPTIONS, "query_layer", "query_b", "query_b_layer",
                                        "layers_shown", "page_size", "ncols", "tile_px"])
        self._watch(self._on_store, ["store"])
        self._watch(self._on_paging, ["label", "order", "seed"])
        self._watch(self._on_filter_by, ["filter_by"])
        self._watch(lambda *e: self._check_tab(), ["tab"])
        self._watch(lambda *e: self.param.trigger("search_now"), ["k"])

    def start(self, n_tabs: int = 1) -> None:
        """Validate everything given at construction and publish the first view, once the app
        knows how many tabs it has (``tab`` is checked against them)."""
        self._n_tabs = max(1, int(n_tabs))
        problems, self._problems = self._problems, []
        if self._url_tab is not None:
            problems += self._set_url_values({"tab": self._url_tab})
        problems += self._check_tab()
        self._apply_state(initial=True, problems=problems)
        if self.order == "similar" and self.current is not None:  # a URL in similarity order
            self._on_paging()

    # ======================================================================= store & state
    def _watch(self, fn: Callable[..., Any], names: list[str]) -> None:
        """Watch inputs, except while :meth:`_set_quietly` sets several at once."""
        def guarded(*events: param.parameterized.Event) -> None:
            if not self._quiet:
                fn()
        self.param.watch(guarded, names)

    def _set_quietly(self, **values: Any) -> None:
        """Set parameters together without the state's own reactions (the caller publishes once).

        Not ``discard_events``: that would also keep widgets linked to the parameters on the old
        values (a store switch left *Layers shown* naming the previous store's layers, and the
        browser then sent those back as an invalid update).
        """
        quiet, self._quiet = self._quiet, True
        try:
            self.param.update(**values)
        finally:
            self._quiet = quiet

    def _open_store(self, url: str, initial: dict[str, Any] | None = None) -> None:
        # a new session sees images committed since the last one; damaged images become grey tiles
        self.reader = TolerantReader(refresh_reader(url))
        self.layer_names: list[str] = list(self.reader.layers)
        self._load_table()
        self.param.layers_shown.objects = list(self.layer_names)
        initial = initial or {}
        self._second = None
        self._set_quietly(label=ALL_LABELS, filter_by=LABEL_COLUMN, captions=[], query_b="", query_b_layer="",
                          layers_shown=self._default_layers(),
                          layer=str(initial.get("layer", self.layer_names[0])), page=int(initial.get("page", 1)),
                          function=str(initial.get("function", "cosine")), query=str(initial.get("query", "")))
        self.active_layer = self.layer_names[0]  # the validated `layer`
        self._hovered = None
        self._ranked = self._ranked_for = None
        self.external.clear()  # another store's model: an upload is embedded again for it
        self._external_pixels.clear()
        self._external_names.clear()
        self.engine = OverlayEngine(self.reader, [self.active_layer], external=self.external)

    def _load_table(self) -> None:
        table = self.reader.table()
        self.ok, self.labels = table.ok, table["label"]
        self.columns = {LABEL_COLUMN: self.labels, **table.metadata}
        self.param.filter_by.objects = list(self.columns)
        self.param.captions.objects = list(table.metadata)
        self._set_quietly(has_metadata=bool(table.metadata))
        if self.filter_by not in self.columns:
            self._set_quietly(filter_by=LABEL_COLUMN, label=ALL_LABELS)
        self._set_quietly(captions=[c for c in self.captions if c in table.metadata])
        self._filter_choices()

    def _filter_choices(self) -> None:
        """The filter's values for the column it looks at (of displayable images)."""
        column = self.columns[self.filter_by]
        self.param.label.objects = [ALL_LABELS, *filter_choices(column[self.ok])]

    def _on_filter_by(self) -> None:
        self._filter_choices()
        self._set_quietly(label=ALL_LABELS)
        self._on_paging()

    def card_extra(self, image: int) -> list[str]:
        """``column: value`` lines of the chosen metadata columns, for a top-k card."""
        if not 0 <= image < len(self.labels):
            return []
        if image in self.reader.damaged:
            return ["unreadable (damaged in the store)"]
        return [f"{c}: {caption_value(self.columns[c][image])}" for c in self.captions if c in self.columns]

    def tile_captions(self, ids: np.ndarray) -> list[str]:
        """``#id label`` and the chosen metadata columns' values, for tiles and exports."""
        out = []
        for i in ids:
            if int(i) in self.reader.damaged:
                out.append(f"#{i} unreadable")
                continue
            parts = [f"#{i} {self.labels[i]}".rstrip()]
            parts += [caption_value(self.columns[c][i]) for c in self.captions if c in self.columns]
            text = " · ".join(p for p in parts if p)
            limit = max(8, self.tile_px // CAPTION_PX_PER_CHAR)  # one tile wide, 10 px font
            out.append(text if len(text) <= limit else text[:limit - 1] + "…")
        return out

    def on_commit(self) -> bool:
        """Catch up with the shared reader's newest commit, keeping layer, query and page.

        Called on the session's document lock by :mod:`explorer.reload` once the process's
        reader saw a new commit. What depends on the image count changes: the image list (label
        filter and order), the label choices, the page count; the page is published again.
        Returns False when this session already shows that commit.
        """
        if self.reader.n_images == len(self.ok):
            return False
        self._load_table()
        self._reorder()
        self._publish()
        return True

    def shown_layers(self) -> list[str]:
        """Layers drawn, in store order; always includes the layer the pointer snaps to."""
        chosen = set(self.layers_shown) | {self.active_layer}
        return [name for name in self.layer_names if name in chosen]

    def hw(self, layer: str) -> tuple[int, int]:
        """A layer's patch grid (height, width)."""
        g = self.reader.geometry(layer)
        return g.height, g.width

    @property
    def valid_function(self) -> str:
        """``function`` once validated (before, a bad URL value may sit there for a moment)."""
        return self.function if self.function in SIMILARITY_FUNCTIONS else "cosine"

    def say(self, text: str) -> None:
        log.info("explorer: %s", text)
        self.message = text

    def _apply_state(self, initial: bool = False, problems: Sequence[str] = ()) -> None:
        """Validate the inputs (bad ones: message + fallback), then publish the view.

        ``problems`` are earlier failures (URL values of the wrong type) to report alongside.
        """
        if self._updating:
            return
        self._updating = True
        problems = list(problems)
        try:
            if self.layer not in self.layer_names:
                problems.append(f"unknown layer {self.layer!r}; this store has {self.layer_names}")
                self._set_quietly(layer=self.active_layer)
            elif self.layer != self.active_layer:
                self._switch_layer(self.layer)
            if self.function not in SIMILARITY_FUNCTIONS:
                problems.append(f"unknown similarity function {self.function!r}; choose from "
                                f"{list(SIMILARITY_FUNCTIONS)}")
                self._set_quietly(function="cosine")
            last = n_pages(len(self.order_ids), self.page_size)
            if not 1 <= self.page <= last:
                problems.append(f"page {self.page} does not exist; pages are 1 to {last}")
                self._set_quietly(page=min(max(1, self.page), last))
            if self.query_layer and self.query_layer not in self.layer_names:
                problems.append(f"unknown query layer {self.query_layer!r}; this store has {self.layer_names}")
                self._set_quietly(query="", query_layer="")
            if self.query:
                try:
                    image, y, x = parse_query_text(self.query)
                    self._hovered = self.engine.validate(Query(image, y, x, self.query_layer or self.active_layer))
                except (ValueError, StoreError) as exc:
                    problems.append(f"bad query: {exc}")
                    self._set_quietly(query="", query_layer="")
            elif self.query_layer:
                self._set_quietly(query_layer="")
            self._second = self._validated_b(problems)
        finally:
            self._updating = False
        if problems:
            self.say("; ".join(problems))
        elif not initial:
            self.message = ""
        self._publish(settle=True)

    def _publish(self, settle: bool = False) -> None:
        """The validated view and query, in one update (``settle``: the slow views follow too)."""
        shown = self.shown_layers()
        self.engine.set_layers(shown)
        total = len(self.order_ids)
        view = PageView(store=str(self.store), layers=tuple(shown), active_layer=self.active_layer,
                        ids=tuple(int(i) for i in self.page_ids()), page=self.page,
                        pages=n_pages(total, self.page_size), total=total, function=self.valid_function,
                        page_size=self.page_size, ncols=self.ncols, tile_px=self.tile_px, note=self._order_note())
        values: dict[str, Any] = {"view": view, "current": self._hovered,
                                  "pinned": bool(self.query) and self._hovered is not None, "second": self._second}
        if settle:  # None after a store switch: the slow views drop the old store's query
            values["settled"] = self._hovered
        with self._hold():
            self.param.update(**values)

    def _validated_b(self, problems: list[str]) -> Query | None:
        """Query B from its inputs, or None (a bad one: a problem, and B is cleared)."""
        if not self.query_b:
            if self.query_b_layer:
                self._set_quietly(query_b_layer="")
            return None
        layer = self.query_b_layer or self.active_layer
        try:
            if layer not in self.layer_names:
                raise ValueError(f"unknown layer {layer!r}; this store has {self.layer_names}")
            image, y, x = parse_query_text(self.query_b)
            return self.engine.validate(Query(image, y, x, layer))
        except (ValueError, StoreError) as exc:
            problems.append(f"bad query B: {exc}")
            self._set_quietly(query_b="", query_b_layer="")
            return None

    def pin_b(self, query: Query | None = None) -> None:
        """Pin query B: ``query``, or the query shown now. When that is the pinned A, A is
        unpinned in the same step: B stays, and A follows the pointer again (pin it to fix it)."""
        query = query if query is not None else (self.current or self.settled)
        if query is None:
            self.say("hover or pin a patch before pinning it as query B")
            return
        with self._hold():
            values = {"query_b_layer": query.layer}
            if self.query and query == self.current:
                values.update(query="", query_layer="")
            self._set_quietly(**values)
            self.query_b = query.as_text()

    def unpin_b(self) -> None:
        with self._hold():
            self._set_quietly(query_b_layer="")
            self.query_b = ""

    def _switch_layer(self, layer: str) -> None:
        """Snap to another layer. A pinned query stays the cell of its own layer (re-expressing it in
        a coarser layer and back would move it: fine (12,7) -> coarse -> fine (14,6)); a hovered
        one moves to the cell of the new layer covering the same place."""
        old, self.active_layer = self.active_layer, layer
        if self._hovered is not None and self.query:
            if not self.query_layer:
                self._set_quietly(query_layer=self._hovered.layer or old)
        elif self._hovered is not None:
            y, x = self.mapped(self._hovered, layer)
            self._hovered = Query(self._hovered.image, y, x, layer)

    def _on_store(self) -> None:
        old = self.view.store if self.view is not None else None
        # quiet until the new store's state is whole: widgets answer their new options by writing
        # values back (Layers shown), which would publish half of it
        quiet, self._quiet = self._quiet, True
        try:
            self._set_quietly(store_key=self.store_keys[self.store])
            self._open_store(self.store)
            self._reorder()
        finally:
            self._quiet = quiet
        self._apply_state(initial=True)
        if old is not None and old != self.store and set(self.reader.layers) != set(get_reader(old).layers):
            self.say(f"this store has other layers: showing {', '.join(self.shown_layers())}, "
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

    def _check_tab(self) -> list[str]:
        if 0 <= self.tab < self._n_tabs:
            return []
        problem = f"tab {self.tab} does not exist; tabs are 0 to {self._n_tabs - 1}"
        self._set_quietly(tab=0)
        return [problem]

    def choose_store(self, key: str) -> None:
        """Switch to the store whose display name is ``key`` (the Store selector's value: a
        browser never sees server paths); an unknown name is ignored."""
        urls = [u for u, k in self.store_keys.items() if k == str(key)]
        if urls and urls[0] != self.store:
            self.store = urls[0]

    def _set_url_values(self, mapped: dict[str, Any]) -> list[str]:
        """Set URL values without reactions; a value param refuses becomes a problem."""
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

    def apply_url(self, mapped: dict[str, Any]) -> None:
        """Show the view a URL names (the browser's back / forward, an edited address).

        Values are set without reactions, the ones param refuses collected, then the whole state
        is validated and published once, so a URL with several bad values reports all of them
        in one message and no value undoes another (a label filter resetting the page).
        """
        mapped = {k: v for k, v in mapped.items() if k in URL_PARAMETERS and not same_value(v, getattr(self, k))}
        if not mapped:
            return  # the URL says what is shown (e.g. the browser reporting the address it opened)
        problems = []
        with self._hold():
            key = mapped.pop("store_key", None)
            if key not in (None, "", self.store_key):
                urls = [u for u, k in self.store_keys.items() if k == str(key)]
                if urls:
                    self.store = urls[0]
                else:
                    problems.append(f"unknown store {key!r}; choose from {sorted(self.store_keys.values())}")
            problems += self._set_url_values(mapped)
            problems += self._check_layers_shown()
            problems += self._check_tab()
            self._reorder()
            self._apply_state(problems=problems)

    # ============================================================================= paging
    def _reorder(self) -> None:
        cand = candidate_ids(self.ok, self.columns[self.filter_by], self.label)
        self.order_ids = ordered_ids(cand, self.order, self.seed, self._ranked)

    def page_ids(self) -> np.ndarray:
        """Image ids on the current page."""
        return page_of(self.order_ids, self.page - 1, self.page_size)

    def next_page_ids(self) -> np.ndarray:
        """Image ids of the page after this one (what a session that pages reads ahead)."""
        return page_of(self.order_ids, self.page, self.page_size)

    def go(self, delta: int) -> None:
        """Previous / next page."""
        last = n_pages(len(self.order_ids), self.page_size)
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

    def _on_paging(self) -> None:
        if self.order == "similar" and self._ranked is None:
            self._rank_similar()
        self._reorder()
        with self._hold():
            if self.page != 1:
                self.page = 1  # -> _apply_state
            else:
                self._publish()

    def _rank_similar(self) -> None:
        """Whole-store search from the current query, aggregated to images."""
        q = self.current if self.current is not None else self._hovered
        if q is None:
            self.say("hover or pin a query before sorting by similarity")
            self._ranked = np.empty(0, dtype=np.int64)
            return
        qv = self.query_vector(q)
        g = self.reader.geometry(q.layer)
        k = min(self.reader.n_images * g.patches_per_image, max(400, 20 * self.page_size))
        top = get_search(str(self.store), q.layer).search(qv.unit, k)
        self._ranked = images_by_best_patch(top.ids, g.patches_per_image)
        self._ranked_for = (q, k)

    def _order_note(self) -> str:
        """How the similarity order was found, when it is the order shown."""
        if self.order != "similar" or self._ranked is None or self._ranked_for is None:
            return ""
        (q, k), ranked = self._ranked_for, int(np.isin(self.order_ids, self._ranked).sum())
        rest = len(self.order_ids) - ranked
        note = (f" · by similarity to #{q.image} ({q.y},{q.x}) in {q.layer}: {ranked} ranked by their best "
                f"patch among the {k} nearest patches")
        return note + (f", {rest} more follow in store order" if rest else "")

    def open_image(self, image: int) -> None:
        """Bring an image (a top-k hit's) onto the page, clearing filters that hide it."""
        with self._hold():
            page = page_containing(self.order_ids, image, self.page_size)
            if page is None:
                self._set_quietly(label=ALL_LABELS, order="index")
                self._reorder()
                page = page_containing(self.order_ids, image, self.page_size) or 0
            if self.page != page + 1:
                self.page = page + 1
            else:
                self._publish()

    # ============================================================================ queries
    def hover(self, query: Query) -> None:
        """The pointer is on a patch of the active layer (ignored while a query is pinned)."""
        if self.query:
            return
        self._hovered = query
        self.current = query

    def rest(self) -> None:
        """The pointer rested: the slow views follow the current query."""
        if self.current is not None and self.settled != self.current:
            self.settled = self.current

    def click(self, query: Query) -> None:
        """A click on a patch: pin it, or unpin (following the clicked patch)."""
        if self.query:
            self.unpin(query)
        else:
            self.pin_query(query)

    def pin(self, image: int, y: int, x: int) -> None:
        """Pin the query at (image, y, x) of the active layer (numeric inputs, notebooks)."""
        self.pin_query(Query(int(image), int(y), int(x), self.active_layer))

    def pin_query(self, query: Query) -> None:
        """Pin through the URL-mirrored inputs: the cell, and the layer it is a cell of."""
        self._set_quietly(query_layer=query.layer)
        self.query = query.as_text()

    def unpin(self, follow: Query | None = None) -> None:
        """Let the overlays follow the pointer again (starting at ``follow`` if given)."""
        with self._hold():
            self._set_quietly(query_layer="")
            if follow is not None:
                self._hovered = follow
            self.query = ""

    def add_upload(self, name: str, pixels: np.ndarray,
                   layers: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
        """Make an uploaded image queryable: ``layers`` maps each of the store's layers to its
        float16 (H, W, D) unit vectors and float32 (H, W) norms, as a build would store them.
        Returns its id (negative, never reused) and publishes it as ``upload``."""
        missing = [name for name in self.layer_names if name not in layers]
        if missing:
            raise ValueError(f"the upload lacks layers {missing}")
        for layer, (vectors, _) in layers.items():
            g = self.reader.geometry(layer)
            if vectors.shape != (g.height, g.width, g.dim):
                raise ValueError(f"upload vectors of {layer} are {vectors.shape}, the store's are "
                                 f"{(g.height, g.width, g.dim)}")
        uid, self._next_upload = self._next_upload, self._next_upload - 1
        self.external[uid] = {layer: page_block(v[None], n[None]) for layer, (v, n) in layers.items()}
        self._external_pixels[uid] = np.asarray(pixels, dtype=np.uint8)
        self._external_names[uid] = str(name)
        for old in [i for i in self.external if i != uid]:  # one upload at a time (memory)
            if not (self._hovered is not None and self._hovered.image == old):
                self.external.pop(old)
                self._external_pixels.pop(old, None)
                self._external_names.pop(old, None)
        self.upload = uid
        return uid

    def is_upload(self, image: int) -> bool:
        return int(image) in self.external

    def image_name(self, image: int) -> str:
        """How a message names an image: ``#id label``, or the uploaded file's name."""
        if self.is_upload(image):
            return f"the upload {self._external_names[int(image)]}"
        return f"#{image} {self.labels[image]}".rstrip()

    def image_pixels(self, image: int) -> np.ndarray:
        """One image's model-input pixels (S, S, 3), a store image's or an upload's."""
        if self.is_upload(image):
            return self._external_pixels[int(image)][None]
        return self.reader.pixels(np.array([int(image)]))

    def mapped(self, query: Query, layer: str) -> tuple[int, int]:
        """The query's cell in another layer (receptive-field centre mapping)."""
        return self.engine.mapped(query, layer)

    def query_vector(self, query: Query) -> QueryVector:
        """The query patch's vector in its own layer."""
        return self.engine.query_vectors(query, [query.layer])[query.layer]

    # ============================================================================= colours
    def clim(self, layer: str) -> tuple[float, float]:
        """The fixed colour range of a layer's maps for the validated function and range."""
        st = get_layer_stats(str(self.store), layer)
        nonnegative = {"auto": st.nonnegative, "positive": True, "symmetric": False}[self.value_range]
        return color_range(self.valid_function, nonnegative=nonnegative, norm_hi=st.norm_hi)

    def sigmas(self, layers: Sequence[str] | None = None) -> dict[str, float]:
        """RBF sigma per layer: the layer's median norm times ``sigma_scale``."""
        return {name: get_layer_stats(str(self.store), name).norm_median * self.sigma_scale
                for name in (layers if layers is not None else self.shown_layers())}
