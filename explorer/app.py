"""The explorer app: a page of images whose similarity overlays follow the pointer.

:class:`ExplorerApp` holds the state (store, layer, query, page, similarity function, ...) as
parameters, some of them mirrored in the URL. Its views are Bokeh figures built once
(:mod:`explorer.figures`) and only fed arrays; all numbers come from
:class:`explorer.engine.OverlayEngine` and :mod:`explorer.kernels`. The hover path is:

browser snaps the pointer to a patch and outlines it (:mod:`explorer.js`) -> one small pointer
source change reaches :meth:`ExplorerApp._on_pointer` -> one memoised matmul per shown layer ->
one overlay source per layer updated in place inside ``pn.io.hold`` -> one websocket message.

Top-k search (slower: a whole-store search) runs after the pointer rests, in a worker thread,
and never blocks hovering.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource
from holoviews.plotting.util import process_cmap

from stores import StoreError

from .engine import OverlayEngine, Query, parse_query_text
from .export import compose_grid_png
from .figures import OUTLINE_COLUMNS, GridSpec, LayerFigure, SharedSources, empty_columns
from .kernels import SIMILARITY_FUNCTIONS, QueryVector, color_range, images_by_best_patch
from .paging import (
    ALL_LABELS,
    ORDERS,
    candidate_ids,
    n_pages,
    ordered_ids,
    page_containing,
    page_of,
)
from .resources import get_layer_stats, get_reader, get_search
from .session import set_nodelay
from .topk import Hit, crop_png, hit_card, search_hits

log = logging.getLogger(__name__)

#: Colour maps offered for the overlays (names HoloViews resolves without matplotlib).
COLORMAPS: tuple[str, ...] = ("viridis", "inferno", "magma", "plasma", "cividis", "fire", "kbc", "coolwarm")
#: URL query parameter for each synced app parameter.
URL_PARAMETERS: dict[str, str] = {"layer": "layer", "query": "query", "page": "page", "function": "function"}


def palette(name: str) -> list[str]:
    return list(process_cmap(name, 256))


def _executor() -> ThreadPoolExecutor:
    return pn.state.as_cached("hoverlay-executor", ThreadPoolExecutor, max_workers=2,
                              thread_name_prefix="hoverlay-topk")


class ExplorerApp(param.Parameterized):
    """State and views of one browser session of the explorer."""

    # Mirrored in the URL. Plain strings so that a bad URL value reaches our validation (and a
    # visible message) instead of failing inside param.
    layer = param.String(default="", doc="Layer whose patches the pointer snaps to.")
    query = param.String(default="", doc="Pinned query 'image,y,x' in `layer`; '' when following the pointer.")
    page = param.Integer(default=1, doc="1-based page number.")
    function = param.String(default="cosine", doc="Similarity function: cosine, dot or rbf.")

    store = param.Selector(default=None, objects=[], doc="Store URL.")
    layers_shown = param.ListSelector(default=[], objects=[], doc="Layers drawn side by side.")
    page_size = param.Integer(default=16, bounds=(1, 64))
    ncols = param.Integer(default=4, bounds=(1, 16), doc="Tiles per row in each layer's grid.")
    tile_px = param.Integer(default=110, bounds=(40, 400), doc="Displayed tile size in pixels.")
    label = param.Selector(default=ALL_LABELS, objects=[ALL_LABELS])
    order = param.Selector(default="index", objects=list(ORDERS))
    seed = param.Integer(default=0)
    cmap = param.Selector(default="viridis", objects=list(COLORMAPS))
    alpha = param.Number(default=0.6, bounds=(0.0, 1.0))
    sigma_scale = param.Number(default=1.0, bounds=(0.05, 10.0), doc="RBF sigma in units of the layer's median norm.")
    k = param.Integer(default=8, bounds=(1, 64), doc="Number of dataset-wide neighbours shown.")
    topk_delay_ms = param.Integer(default=120, bounds=(0, None), doc="Pointer rest before a top-k search.")
    message = param.String(default="")

    def __init__(self, stores: Sequence[str], **params: Any):
        urls = [str(s) for s in stores]
        if not urls:
            raise ValueError("create_app needs at least one store")
        self._doc = pn.state.curdoc
        self._current: Query | None = None  # what the overlays show: pinned query or hovered patch
        self._ranked: np.ndarray | None = None
        self._last_click = 0
        self._topk_token = 0
        self._topk_timeout: Any = None
        self._figures: list[LayerFigure] = []
        self._query_figures: list[LayerFigure] = []
        self._updating = False
        self._nodelay = False
        self._topk_for: tuple[Query, int, str] | None = None
        super().__init__()
        self.param.store.objects = urls
        store = str(params.pop("store", urls[0]))
        if store not in urls:
            raise ValueError(f"store {store!r} is not one of {urls}")
        with param.parameterized.discard_events(self):
            self.store = store
        self._open_store(store, initial={k: params.pop(k) for k in list(params) if k in URL_PARAMETERS})
        with param.parameterized.discard_events(self):
            self.param.update(**params)
        self._build_widgets()
        self._rebuild()
        self.param.watch(self._on_state, list(URL_PARAMETERS))
        self.param.watch(self._on_store, ["store"])
        self.param.watch(self._on_layout, ["layers_shown", "page_size", "ncols", "tile_px"])
        self.param.watch(self._on_paging, ["label", "order", "seed"])
        self.param.watch(self._on_colors, ["cmap", "sigma_scale"])
        self.param.watch(self._on_alpha, ["alpha"])
        self.param.watch(self._on_k, ["k"])
        self._apply_state(initial=True)

    # ===================================================================== store & state
    def _open_store(self, url: str, initial: dict[str, Any] | None = None) -> None:
        self.reader = get_reader(url)
        self.layer_names = self.reader.layers
        table = self.reader.table()
        self._ok, self._labels = table.ok, table["label"]
        labels = sorted({str(v) for v in self._labels[self._ok]})
        self.param.label.objects = [ALL_LABELS, *labels]
        self.param.layers_shown.objects = list(self.layer_names)
        initial = initial or {}
        with param.parameterized.discard_events(self):
            self.label = ALL_LABELS
            self.layer = str(initial.get("layer", self.layer_names[0]))
            self.layers_shown = list(self.layer_names if len(self.layer_names) <= 3 else self.layer_names[:1])
            self.page = int(initial.get("page", 1))
            self.function = str(initial.get("function", "cosine"))
            self.query = str(initial.get("query", ""))
        self._valid_layer = self.layer_names[0]
        self._topk_for = None
        self._current = None
        self._ranked = None
        self.engine = OverlayEngine(self.reader, [self._valid_layer])

    def shown_layers(self) -> list[str]:
        """Layers drawn, in store order; always includes the layer the pointer snaps to."""
        chosen = set(self.layers_shown) | {self._valid_layer}
        return [name for name in self.layer_names if name in chosen]

    def _say(self, text: str) -> None:
        log.info("explorer: %s", text)
        self.message = text

    def _apply_state(self, initial: bool = False) -> None:
        """Validate the URL-mirrored parameters, then redraw what they affect."""
        if self._updating:
            return
        self._updating = True
        problems = []
        try:
            if self.layer not in self.layer_names:
                problems.append(f"unknown layer {self.layer!r}; this store has {self.layer_names}")
                self.layer = self._valid_layer
            elif self.layer != self._valid_layer:
                self._switch_layer(self.layer)
            if self.function not in SIMILARITY_FUNCTIONS:
                problems.append(f"unknown similarity function {self.function!r}; choose from "
                                f"{list(SIMILARITY_FUNCTIONS)}")
                self.function = "cosine"
            last = n_pages(len(self._ordered), self.page_size)
            if not 1 <= self.page <= last:
                problems.append(f"page {self.page} does not exist; pages are 1 to {last}")
                self.page = min(max(1, self.page), last)
            pinned = None
            if self.query:
                try:
                    image, y, x = parse_query_text(self.query)
                    pinned = self.engine.validate(Query(image, y, x, self._valid_layer))
                except (ValueError, StoreError) as exc:
                    problems.append(f"bad query: {exc}")
                    self.query = ""
            if pinned is not None:
                self._current = pinned
        finally:
            self._updating = False
        self._show_page()
        if problems:
            self._say("; ".join(problems))
        elif not initial:
            self.message = ""
        if self._current is not None:
            self._schedule_topk()

    def _switch_layer(self, layer: str) -> None:
        """Snap to another layer: remap the current query to the cell covering the same place."""
        self._valid_layer = layer
        if self._current is not None:
            y, x = self.engine.mapped(self._current, layer)
            self._current = Query(self._current.image, y, x, layer)
            if self.query:
                self.query = self._current.as_text()
        if layer not in self.engine.layers:
            self._rebuild()

    def _on_state(self, *events: param.parameterized.Event) -> None:
        self._apply_state()

    def _on_store(self, event: param.parameterized.Event) -> None:
        self._open_store(event.new)
        self._layer_select.options = self.layer_names
        self._rebuild()
        self._apply_state()

    def _url_error(self, mapped: dict[str, Any]) -> None:
        """Location sync could not apply URL values at once: apply them one by one, report the bad."""
        for name, value in mapped.items():
            try:
                setattr(self, name, value)
            except Exception:  # wrong type for the parameter
                try:
                    setattr(self, name, str(value))
                except Exception as exc:
                    self._say(f"bad URL value {name}={value!r}: {exc}")

    # ============================================================================ paging
    @property
    def _ordered(self) -> np.ndarray:
        cand = candidate_ids(self._ok, self._labels, self.label)
        return ordered_ids(cand, self.order, self.seed, self._ranked)

    def page_ids(self) -> np.ndarray:
        return page_of(self._ordered, self.page - 1, self.page_size)

    def _on_paging(self, *events: param.parameterized.Event) -> None:
        if self.order == "similar" and (self._ranked is None or any(e.name == "order" for e in events)):
            self._rank_similar()
        self.page = 1
        self._show_page()

    def _rank_similar(self) -> None:
        """Order images by their best patch's similarity to the current query (whole store)."""
        if self._current is None:
            self._say("hover or pin a query before sorting by similarity")
            self._ranked = np.empty(0, dtype=np.int64)
            return
        q = self._current
        qv = self.engine.query_vectors(q, [q.layer])[q.layer]
        g = self.reader.geometry(q.layer)
        search = get_search(self.store, q.layer)
        k = min(self.reader.n_images * g.patches_per_image, max(400, 20 * self.page_size))
        top = search.search(qv.unit, k)
        self._ranked = images_by_best_patch(top.ids, g.patches_per_image)

    def _go(self, delta: int) -> None:
        last = n_pages(len(self._ordered), self.page_size)
        self.page = min(max(1, self.page + delta), last)

    # ============================================================================ views
    def _palette(self) -> list[str]:
        return palette(self.cmap)

    def _clim(self, layer: str) -> tuple[float, float]:
        st = get_layer_stats(self.store, layer)
        return color_range(self.function, nonnegative=st.nonnegative, norm_hi=st.norm_hi)

    def _sigmas(self) -> dict[str, float]:
        return {name: get_layer_stats(self.store, name).norm_median * self.sigma_scale
                for name in self.shown_layers()}

    def _title(self, layer: str) -> str:
        g = self.reader.geometry(layer)
        mark = " ◆" if layer == self._valid_layer else ""
        return f"{layer}  {g.height}×{g.width}×{g.dim}{mark}"

    def _rebuild(self) -> None:
        """(Re)build the figures: on start, and when shown layers or the grid's shape change."""
        shown = self.shown_layers()
        self.engine.set_layers(shown)
        s = self.reader.image_size
        self.spec = GridSpec(self.page_size, min(self.ncols, self.page_size), s, self.tile_px,
                             label_band=0.16)
        self.shared = SharedSources.create("grid")
        self.shared.pointer.on_change("data", self._on_pointer)
        self.qspec = GridSpec(1, 1, s, max(self.tile_px, 150))
        self.qshared = SharedSources.create("query")
        self.mapped_source = ColumnDataSource(empty_columns(OUTLINE_COLUMNS), name="query-mapped")
        pal = self._palette()
        self._figures, self._query_figures = [], []
        for name in shown:
            g = self.reader.geometry(name)
            common = dict(palette=pal, clim=self._clim(name), alpha=self.alpha, title=self._title(name))
            self._figures.append(LayerFigure(name, (g.height, g.width), self.spec, self.shared, **common))
            self._query_figures.append(LayerFigure(name, (g.height, g.width), self.qspec, self.qshared,
                                                   prefix="query", hover=False,
                                                   outline_source=self.mapped_source, **common))
        self._grid_row.objects = [pn.pane.Bokeh(f.plot) for f in self._figures]
        self._query_row.objects = [pn.pane.Bokeh(f.plot) for f in self._query_figures]
        self._shown_images = np.empty(0, dtype=np.int64)
        self._query_image = -1

    def _show_page(self) -> None:
        """Send the page's images once, then the overlays for the current query."""
        ids = self.page_ids()
        self.engine.set_page(ids)
        with pn.io.hold(self._doc):
            if not np.array_equal(ids, self._shown_images):
                captions = [f"#{i} {self._labels[i]}" for i in ids]
                self.shared.set_images(self.spec, self.reader.pixels(ids) if ids.size else
                                       np.zeros((0, self.reader.image_size, self.reader.image_size, 3), np.uint8),
                                       captions)
                self._shown_images = ids
            self.shared.set_config(self.shown_layers(), [self._hw(n) for n in self.shown_layers()],
                                   self._valid_layer, len(ids))
            for fig in self._figures + self._query_figures:
                fig.set_colors(clim=self._clim(fig.layer))  # the similarity function may have changed
                fig.colorbar.title = self.function
            for fig in self._figures:
                fig.plot.title.text = self._title(fig.layer)
            self._show_query(self._current, force=True)
        total = len(self._ordered)
        self._page_info.object = (f"page **{self.page}** / {n_pages(total, self.page_size)} · "
                                  f"{total} images")

    def _hw(self, layer: str) -> tuple[int, int]:
        g = self.reader.geometry(layer)
        return g.height, g.width

    def _show_query(self, query: Query | None, force: bool = False) -> None:
        """Overlays of every shown layer for ``query`` (the hover hot path)."""
        if not force and query == self._drawn:
            return
        self._drawn = query
        ids = self._shown_images
        n = len(ids)
        with pn.io.hold(self._doc):
            if query is None:
                for fig in self._figures:
                    fig.set_maps(None, n)
                return
            maps = self.engine.page_maps(query, self.function, self._sigmas())
            for fig in self._figures:
                fig.set_maps(maps[fig.layer], n)
            self._show_layer_view(query)
            self._show_pin()

    _drawn: Query | None = None

    def _show_layer_view(self, query: Query) -> None:
        """The query image in every shown layer with the mapped patch outlined."""
        if query.image != self._query_image:
            self.qshared.set_images(self.qspec, self.reader.pixels(np.array([query.image])))
            self._query_image = query.image
        maps = self.engine.image_maps(query.image, query, self.function, self._sigmas())
        rows: dict[str, list] = empty_columns(OUTLINE_COLUMNS)
        label = self._labels[query.image]
        for fig in self._query_figures:
            fig.set_maps(maps[fig.layer], 1)
            y, x = self.engine.mapped(query, fig.layer)
            box = self.qspec.outline(0, y, x, fig.hw)
            for col, v in (("fig", fig.layer), ("tile", 0), ("y", y), ("x", x), *box.items()):
                rows[col].append(v)
            fig.plot.title.text = f"{fig.layer} ({y},{x}) · #{query.image} {label}"
        self.mapped_source.data = rows

    def _show_pin(self) -> None:
        """Outline the pinned query on its tile in every layer, if its image is on the page."""
        rows: dict[str, list] = empty_columns(OUTLINE_COLUMNS)
        q = self._current if self.query else None
        hit = np.flatnonzero(self._shown_images == q.image) if q is not None else np.empty(0)
        if q is not None and hit.size:
            for fig in self._figures:
                y, x = self.engine.mapped(q, fig.layer)
                box = self.spec.outline(int(hit[0]), y, x, fig.hw)
                for col, v in (("fig", fig.layer), ("tile", int(hit[0])), ("y", y), ("x", x), *box.items()):
                    rows[col].append(v)
        if rows != dict(self.shared.pin.data):
            self.shared.pin.data = rows

    def _on_colors(self, *events: param.parameterized.Event) -> None:
        pal = self._palette()
        with pn.io.hold(self._doc):
            for fig in self._figures + self._query_figures:
                fig.set_colors(pal, self._clim(fig.layer))
            self._show_query(self._current, force=True)

    def _on_alpha(self, event: param.parameterized.Event) -> None:
        with pn.io.hold(self._doc):
            for fig in self._figures + self._query_figures:
                fig.set_alpha(event.new)

    def _on_layout(self, *events: param.parameterized.Event) -> None:
        self._rebuild()
        self._apply_state()

    # =========================================================================== pointer
    def _on_pointer(self, attr: str, old: Any, new: dict[str, list]) -> None:
        """The browser reports a new patch under the pointer, or a click (pin / unpin)."""
        if not self._nodelay:
            self._nodelay = True
            set_nodelay(self._doc)
        if not new.get("tile") or new["tile"][0] < 0:
            return
        tile, y, x, click = (int(new[c][0]) for c in ("tile", "y", "x", "click"))
        if tile >= len(self._shown_images):
            return
        hovered = Query(int(self._shown_images[tile]), y, x, self._valid_layer)
        if click != self._last_click:
            self._last_click = click
            if self.query:
                self.query = ""  # unpin: overlays follow the pointer again
                self._set_current(hovered)
            else:
                self.query = hovered.as_text()  # pin (through the URL-mirrored parameter)
            return
        if not self.query:
            self._set_current(hovered)

    def _set_current(self, query: Query) -> None:
        self._current = query
        self._show_query(query)
        self._schedule_topk()

    def pin(self, image: int, y: int, x: int) -> None:
        """Pin the query at (image, y, x) of the current layer (numeric inputs, API)."""
        self.query = f"{int(image)},{int(y)},{int(x)}"

    # ============================================================================= top-k
    def _schedule_topk(self, force: bool = False) -> None:
        """Search the whole store once the pointer rests (never on the hover path itself)."""
        query = self._current
        if query is None:
            return
        key = (query, self.k, self.store)
        if key == self._topk_for and not force:
            return
        self._topk_for = key
        self._topk_token += 1
        token = self._topk_token
        doc = self._doc
        if doc is None or doc.session_context is None:  # no server loop: search synchronously
            qv = self.engine.query_vectors(query, [query.layer])[query.layer]
            self._show_topk(token, self._compute_topk(query, qv, self.k))
            return
        if self._topk_timeout is not None:
            with contextlib.suppress(ValueError):  # already ran
                doc.remove_timeout_callback(self._topk_timeout)
        self._topk_timeout = doc.add_timeout_callback(partial(self._start_topk, token, query),
                                                      self.topk_delay_ms)

    def _start_topk(self, token: int, query: Query) -> None:
        self._topk_timeout = None
        if token != self._topk_token:
            return
        doc = self._doc
        qv = self.engine.query_vectors(query, [query.layer])[query.layer]  # engine stays on this thread
        future = _executor().submit(self._compute_topk, query, qv, self.k)

        def done(f: Future) -> None:
            doc.add_next_tick_callback(partial(self._finish_topk, token, f))

        future.add_done_callback(done)

    def _finish_topk(self, token: int, future: Future) -> None:
        try:
            result = future.result()
        except Exception as exc:  # a failed search must not break hovering
            log.exception("top-k search failed")
            self._say(f"top-k search failed: {exc}")
            return
        self._show_topk(token, result)

    def _compute_topk(self, query: Query, qv: QueryVector, k: int
                      ) -> tuple[Query, list[tuple[Hit, str]], str | None, bool]:
        """Runs in a worker thread: search, then crops (touches only the shared reader and index)."""
        search = get_search(self.store, query.layer)
        hits, exact = search_hits(search, qv, k)
        cards = [(h, hit_card(h, crop_png(self.reader, query.layer, h), rank))
                 for rank, h in enumerate(hits)]
        return query, cards, search.warning, exact

    def _show_topk(self, token: int, result: tuple[Query, list[tuple[Hit, str]], str | None, bool]) -> None:
        if token != self._topk_token:
            return  # the query moved on while searching
        query, cards, warning, exact = result
        items = []
        for hit, card in cards:
            button = pn.widgets.Button(name=f"open #{hit.image}", button_type="light", width=96,
                                       height=26, margin=(0, 2))
            button.on_click(partial(self._open_hit, hit))
            items.append(pn.Column(pn.pane.HTML(card, width=100, margin=(0, 2)), button, width=104,
                                   css_classes=["topk-card"]))
        how = "exact scan" if exact else "index + exact re-rank"
        head = (f"**Top {len(cards)}** patches of the store closest to #{query.image} "
                f"({query.y},{query.x}) in `{query.layer}` — cosine, {how}")
        if warning:
            head += f"  \n⚠ {warning}"
        self._topk_head.object = head
        self._topk_items.objects = items

    def _open_hit(self, hit: Hit, event: Any = None) -> None:
        """Bring a top-k hit's image onto the page (clearing filters that hide it)."""
        page = page_containing(self._ordered, hit.image, self.page_size)
        if page is None:
            with param.parameterized.discard_events(self):
                self.label, self.order = ALL_LABELS, "index"
            page = page_containing(self._ordered, hit.image, self.page_size) or 0
            self._sync_widgets()
        self.page = page + 1
        self._show_page()

    def _on_k(self, event: param.parameterized.Event) -> None:
        self._schedule_topk(force=True)

    # ============================================================================ export
    def export_png(self) -> io.BytesIO:
        """The current page with its overlays as a PNG (what the download button serves)."""
        ids = self._shown_images
        pixels = self.reader.pixels(ids) if ids.size else np.zeros((0, 1, 1, 3), np.uint8)
        shown = self.shown_layers()
        maps: dict[str, np.ndarray | None] = dict.fromkeys(shown)
        if self._current is not None:
            maps.update(self.engine.page_maps(self._current, self.function, self._sigmas()))
        png = compose_grid_png(pixels, maps, {n: self._clim(n) for n in shown}, self._palette(),
                               self.alpha, self.spec.ncols, [f"#{i} {self._labels[i]}" for i in ids])
        return io.BytesIO(png)

    # =========================================================================== widgets
    def _build_widgets(self) -> None:
        w = pn.widgets
        self._layer_select = w.Select(name="Layer (pointer snaps to)", options=self.layer_names,
                                      value=self._valid_layer)
        self._function_select = w.Select(name="Similarity", options=list(SIMILARITY_FUNCTIONS),
                                         value="cosine")
        self._layer_select.param.watch(lambda e: setattr(self, "layer", e.new), "value")
        self._function_select.param.watch(lambda e: setattr(self, "function", e.new), "value")
        self.param.watch(lambda e: self._sync_widgets(), ["layer", "function", "query", "label", "order"])
        self._qimage = w.IntInput(name="image", value=0, start=0, width=80)
        self._qy = w.IntInput(name="y", value=0, start=0, width=60)
        self._qx = w.IntInput(name="x", value=0, start=0, width=60)
        pin_button = w.Button(name="Pin query", button_type="primary", width=110)
        pin_button.on_click(lambda e: self.pin(self._qimage.value, self._qy.value, self._qx.value))
        unpin_button = w.Button(name="Unpin", width=80)
        unpin_button.on_click(lambda e: setattr(self, "query", ""))
        self._pin_state = pn.pane.Markdown("", margin=(0, 10))
        prev_b = w.Button(name="◀ prev", width=70)
        next_b = w.Button(name="next ▶", width=70)
        prev_b.on_click(lambda e: self._go(-1))
        next_b.on_click(lambda e: self._go(+1))
        self._page_info = pn.pane.Markdown("", margin=(8, 10))
        sample_b = w.Button(name="Random sample", width=120)
        sample_b.on_click(lambda e: self.param.update(order="random", seed=self.seed + 1))
        similar_b = w.Button(name="Most similar to query", width=160)
        similar_b.on_click(self._on_sort_similar)
        download = w.FileDownload(callback=self.export_png, filename="hoverlay-grid.png",
                                  label="Export grid PNG", button_type="success", width=160)
        store_widgets = ([w.Select.from_param(self.param.store, name="Store")]
                         if len(self.param.store.objects) > 1 else [])
        self._message_pane = pn.pane.Alert("", alert_type="warning", visible=False,
                                           css_classes=["hoverlay-message"], sizing_mode="stretch_width")
        self.param.watch(self._on_message, ["message"])
        self.sidebar = pn.Column(
            pn.pane.Markdown("### hoverlay explorer"),
            *store_widgets,
            self._layer_select,
            w.MultiChoice.from_param(self.param.layers_shown, name="Layers shown"),
            self._function_select,
            w.Select.from_param(self.param.cmap, name="Colour map"),
            w.FloatSlider.from_param(self.param.alpha, name="Overlay opacity", step=0.05),
            w.FloatSlider.from_param(self.param.sigma_scale, name="RBF σ (× median norm)", step=0.05),
            pn.pane.Markdown("**Query** (click a tile to pin / unpin)", margin=(10, 10, 0, 10)),
            pn.Row(self._qimage, self._qy, self._qx),
            pn.Row(pin_button, unpin_button),
            self._pin_state,
            pn.pane.Markdown("**Images**", margin=(10, 10, 0, 10)),
            w.Select.from_param(self.param.label, name="Label"),
            w.Select.from_param(self.param.order, name="Order"),
            pn.Row(sample_b),
            similar_b,
            w.IntInput.from_param(self.param.page_size, name="Page size", width=100),
            w.IntInput.from_param(self.param.ncols, name="Columns", width=100),
            w.IntInput.from_param(self.param.k, name="Top-k", width=100),
            download,
            width=300,
        )
        self._grid_row = pn.Row(sizing_mode="fixed")
        self._query_row = pn.Row()
        self._topk_head = pn.pane.Markdown("**Top-k**: hover a patch", margin=(0, 10))
        self._topk_items = pn.FlexBox(css_classes=["topk-panel"])
        self.main = pn.Column(
            self._message_pane,
            pn.Row(prev_b, next_b, self._page_info),
            self._grid_row,
            pn.pane.Markdown("**Query patch in every shown layer** (outline: mapped patch)",
                             margin=(10, 10, 0, 10)),
            self._query_row,
            self._topk_head,
            self._topk_items,
        )
        self.layout = pn.Row(self.sidebar, self.main, sizing_mode="stretch_width")

    def _sync_widgets(self) -> None:
        self._layer_select.value = self._valid_layer
        if self.function in SIMILARITY_FUNCTIONS:
            self._function_select.value = self.function
        pinned = self.query
        self._pin_state.object = f"pinned: `{pinned}` in `{self._valid_layer}`" if pinned else "following the pointer"
        if pinned and self._current is not None:
            self._qimage.value, self._qy.value, self._qx.value = (self._current.image, self._current.y,
                                                                 self._current.x)

    def _on_message(self, event: param.parameterized.Event) -> None:
        self._message_pane.object = event.new
        self._message_pane.visible = bool(event.new)

    def _on_sort_similar(self, event: Any = None) -> None:
        self._rank_similar()
        if self.order != "similar":
            self.order = "similar"  # _on_paging shows page 1
        else:
            self.page = 1
            self._show_page()

    def on_load(self) -> None:
        """Once the browser is connected: send small websocket messages without Nagle delay."""
        set_nodelay(self._doc)

    def servable_layout(self) -> pn.viewable.Viewable:
        return self.layout


def create_app(stores: Sequence[str] | str, **options: Any) -> pn.viewable.Viewable:
    """Build one session's explorer as a servable Panel layout.

    ``stores`` is one store URL or a list (a selector appears for several). ``options`` set
    :class:`ExplorerApp` parameters (``layer``, ``page_size``, ``k``, ``cmap``, ...). In a server
    session, layer, query, page and similarity function are mirrored in the URL.
    """
    urls = [stores] if isinstance(stores, str) else list(stores)
    app = ExplorerApp(urls, **options)
    if pn.state.location is not None and pn.state.curdoc is not None and pn.state.curdoc.session_context:
        pn.state.location.sync(app, URL_PARAMETERS, on_error=app._url_error)
        pn.state.onload(app.on_load)
    layout = app.servable_layout()
    layout.app = app  # type: ignore[attr-defined]  # handy for tests and notebooks
    return layout
