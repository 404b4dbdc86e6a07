"""The main grid: one figure per shown layer, a page of tiles each, overlays following the pointer.

:class:`GridView` draws what :class:`explorer.state.ExplorerState` publishes and reports the
pointer back to it; it decides nothing about what is shown. The hover path:

1. the browser snaps the pointer to a patch and outlines it in every shown layer
   (:mod:`explorer.js`) — no round trip;
2. **browser path** (the page's vectors fit ``browser_hover_budget``): the browser also computes
   every tile's map of every layer on each move (:mod:`explorer.browser_hover`) and tells the
   server only where the pointer rested or was clicked;
3. **server path**: each patch change is one small pointer-source change; the state's ``current``
   changes, the draw is coalesced (the latest hovered patch wins under load), one memoised matmul
   per shown layer (:meth:`OverlayEngine.page_maps`), one overlay source per layer updated inside
   ``pn.io.hold`` -> one websocket message; the state is told the pointer rested after
   ``topk_delay_ms``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import panel as pn
import param

from .browser_hover import BrowserHover, HoverLink, HoverPath, choose_path
from .engine import OverlayEngine, Query
from .export import ExportLayer, compose_grid_png
from .figures import (
    OUTLINE_COLUMNS,
    LayerFigure,
    SharedSources,
    empty_columns,
    grid_specs,
    outline_rows,
    palette,
    restyle,
)
from .groups_view import GROUP_PALETTE, GroupsOverlay
from .prefetch import PageData, PagePrefetch, read_vectors
from .session import Scheduler, pointer_cell, pointer_flag, set_nodelay
from .sparse_fp16 import PackedLayer
from .state import ExplorerState, PageView
from .widgets import button, colored

log = logging.getLogger(__name__)

#: Server path: ms a hover's draw waits for superseding moves (see GridView._queue_hover).
HOVER_COALESCE_MS = 4
#: How long after a page is shown its successor is read ahead.
PREFETCH_DELAY_MS = 400


def _prefetch_executor() -> ThreadPoolExecutor:
    return pn.state.as_cached("hoverlay-prefetch", ThreadPoolExecutor, max_workers=1,
                              thread_name_prefix="hoverlay-prefetch")


class GridView(pn.viewable.Viewer):
    """The page's tiles in every shown layer, their overlays, the pin outline, paging and export."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")
    link = param.ClassSelector(class_=HoverLink, doc="Shared with the session's other hoverable views.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.link is None:
            self.link = HoverLink()
        self._doc = pn.state.curdoc
        self._scheduler = Scheduler(self._doc)
        self._prefetch = PagePrefetch(_prefetch_executor)
        self._view: PageView | None = None  # what the figures show
        self._grid: tuple[Any, ...] | None = None  # what they were built for
        self._drawn: Query | None = None
        self._drawn_query: tuple[Query | None, bool] | None = None  # what the browser path last got
        self._pinned = False
        self._last_click = 0
        self._rest_timeout: Any = None
        self._hover_pending = False  # a server-path draw of the latest hover is scheduled
        self._pages_shown = 0  # pages this session has shown (read-ahead starts with the second)
        self._read_ahead_for: np.ndarray | None = None  # the shown page whose successor was requested
        self._damaged_shown: set[int] = set()
        self._nodelay = False
        self.figures: list[LayerFigure] = []
        self.shown_images = np.empty(0, dtype=np.int64)
        self.path = HoverPath(False, 0, self.state.browser_hover_budget)
        self.engine = OverlayEngine(self.state.reader, [], external=self.state.external)
        # Rows that wrap: three layers of four 110 px columns are wider than a 1600 px window
        # beside the sidebar, and a Row would overflow it horizontally
        self._row = pn.Row(styles={"flex-wrap": "wrap", "gap": "4px 12px"}, sizing_mode="stretch_width")
        self.groups = GroupsOverlay(state=self.state)
        prev_b, next_b = button("◀ prev", width=70), button("next ▶", width=70)
        prev_b.on_click(lambda e: self.state.go(-1))
        next_b.on_click(lambda e: self.state.go(+1))
        self.page_info = pn.pane.Markdown("", margin=(8, 10))
        self.download = pn.widgets.FileDownload(
            callback=self.export_png, filename="hoverlay-grid.png", label="Export grid PNG", width=160,
            margin=(8, 10), **colored(pn.widgets.FileDownload, "success"))
        self.navigation = pn.Row(prev_b, next_b, self.page_info, self.download)
        self._layout = pn.Column(self.navigation, self.groups, self._row, self.groups.legend,
                                 margin=0, sizing_mode="stretch_width")
        if self.state.view is not None:
            self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    # ========================================================================= from state
    @param.depends("state.view", "state.current", "state.pinned", watch=True)
    def _refresh(self) -> None:
        """A new view redraws the page (rebuilding the figures when the grid changed); a new
        query only the overlays and the pin outline."""
        view = self.state.view
        if view is None:
            return
        with pn.io.hold(self._doc):
            if view != self._view:
                if view.grid != self._grid or self.engine.reader is not self.state.reader:
                    self._rebuild(view)
                self._show_page(view)
                return
            if self.path.browser:
                self._show_overlays(self.state.current)
            elif self.state.current != self._drawn or self.state.pinned != self._pinned:
                self._queue_hover()
            self._show_pin()

    def _rebuild(self, view: PageView) -> None:
        """(Re)build the figures: at start, and when the shown layers or the grid's shape change."""
        state, reader = self.state, self.state.reader
        if self.engine.reader is not reader:
            self.engine = OverlayEngine(reader, [], external=state.external)
            self._prefetch.clear()
        self.engine.set_layers(view.layers)
        hws = {name: state.hw(name) for name in view.layers}
        self.specs = grid_specs(hws, view.page_size, min(view.ncols, view.page_size), reader.image_size,
                                view.tile_px, label_band=0.16)
        self.shared = SharedSources.create("grid")
        self.shared.pointer.on_change("data", self._on_pointer)
        pal = palette(state.cmap)
        self.figures = [LayerFigure(name, self.specs[name], self.shared, index=i, palette=pal,
                                    clim=state.clim(name), alpha=state.alpha, title=self._title(name, view),
                                    hover=False)
                        for i, name in enumerate(view.layers)]
        self.browser = BrowserHover(self.figures, self.shared, link=self.link)
        self.path = HoverPath(False, 0, state.browser_hover_budget)
        # groups glyphs join the figures before the figures join the page: models added to a
        # figure already in the document after the same hold reached the browser unknown
        self.groups.attach(self.figures)
        self._row.objects = [pn.pane.Bokeh(f.plot) for f in self.figures]
        self.shown_images = np.empty(0, dtype=np.int64)
        self._drawn = None
        self._drawn_query = None
        self._grid = view.grid

    def _title(self, layer: str, view: PageView) -> str:
        g = self.state.reader.geometry(layer)
        mark = "  ◆ pointer snaps here" if layer == view.active_layer else ""
        return f"{layer}  {g.height}×{g.width}×{g.dim}{mark}"

    def _show_page(self, view: PageView) -> None:
        """Send the page's images (once per page), colour ranges, then the current overlays."""
        state, reader = self.state, self.state.reader
        ids = view.page_ids
        self.engine.set_page(ids)
        if not np.array_equal(ids, self.shown_images):
            s = reader.image_size
            layers = list(self.browser.vectors)
            ahead = self._prefetch.take(reader, ids, layers)
            pixels = (ahead.pixels if ahead is not None else reader.pixels(ids)) if ids.size \
                else np.zeros((0, s, s, 3), np.uint8)
            self.shared.set_images(self.specs, pixels, state.tile_captions(ids))
            self.shown_images = ids
            self.groups.show_page(ids)
            self._announce_page_vectors(ids, ahead.vectors if ahead is not None else None)
            self._mark_damaged()
            self._pages_shown += 1
            if self._pages_shown > 1:
                self._read_ahead()
        self._view = view
        self._send_config()
        for fig in self.figures:
            fig.set_colors(clim=state.clim(fig.layer))  # the similarity function may have changed
            fig.colorbar.title = view.function
            fig.title.text = self._title(fig.layer, view)
        self._show_overlays(state.current, force=True)
        self._show_pin()
        self._show_page_info()

    def _show_page_info(self) -> None:
        if self._view is not None:
            self.page_info.object = f"{self._view.describe()}  \n{self.path.describe()}"

    def _read_ahead(self) -> None:
        """Read the next page while this one is looked at (browser path: with its vectors), once
        this one is out (on 2 cores a read beside the page's own work slowed it ~0.5 s), and only
        in a session that pages or has hovered the page (at 50 sessions opening at once, reading
        every session's second page at open saturated the server); once per shown page."""
        ids = self.shown_images
        if self._read_ahead_for is not None and np.array_equal(self._read_ahead_for, ids):
            return
        self._read_ahead_for = ids
        reader, nxt, browser = self.state.reader, self.state.next_page_ids(), self.browser
        layers = list(browser.vectors) if self.path.browser else []
        # a session that pages gets the next page's vectors ahead (hoverable once shown)
        ahead = self._pages_shown > 1 and browser.ahead_fits(self.path)

        def request() -> None:
            future = self._prefetch.request(reader, nxt, layers)
            if future is not None and ahead:
                self._scheduler.when_done(future, lambda data, error: self._send_ahead(browser, reader, nxt, data))

        self._scheduler.later(request, PREFETCH_DELAY_MS)

    def _send_ahead(self, browser: BrowserHover, reader: Any, ids: np.ndarray, data: PageData | None) -> None:
        """The next page's vectors into the browser's other slot, unless the figures, the store or
        the next page changed since they were read (a failed read sends nothing: the switch reads
        the page again and reports it)."""
        if data is None or browser is not self.browser or reader is not self.state.reader \
                or not self.path.browser or not np.array_equal(ids, self.state.next_page_ids()):
            return
        with pn.io.hold(self._doc):
            browser.deliver_ahead(ids, data.vectors)

    def _announce_page_vectors(self, ids: np.ndarray,
                               ahead: dict[str, PackedLayer] | None = None) -> None:
        """Choose the page's hover path and, on the browser path, send its vectors (``ahead``:
        already read) in a message of their own, after the page's images: a page's vectors are
        up to 4× its images' bytes, and the browser shows the page while they arrive (measured: a
        switch painted at ~0.26–0.36 s instead of ~0.66–0.70 s with them in the same message)."""
        reader = self.state.reader
        geometries = {}
        for name in self.browser.vectors:  # the figures' layers
            g = reader.geometry(name)
            geometries[name] = (g.height, g.width, g.dim)
        self.path = choose_path(len(ids), geometries, self.state.browser_hover_budget)
        self.link.browser = self.path.browser
        self._drawn_query = None
        browser = self.browser
        if not browser.announce(ids if self.path.browser else None):
            if self.path.browser and ids.size:  # the same page, or one sent ahead: its vectors are there
                self.path = dataclasses.replace(self.path, sent_bytes=browser.sent_bytes)
            return
        number = browser.page_number
        if not self.path.browser or not ids.size:
            browser.deliver(number, None)
            return
        # at open this runs before the page pulls its document, which then holds the vectors:
        # deferred until the page had loaded, they came ~0.6 s later and the page showed only
        # ~0.07 s sooner (the document's other work dominates an open)
        self._scheduler.soon(lambda: self._deliver_page_vectors(browser, reader, ids, number, ahead))

    def _deliver_page_vectors(self, browser: BrowserHover, reader: Any, ids: np.ndarray, number: int,
                              ahead: dict[str, PackedLayer] | None) -> None:
        """Page ``number``'s vectors, unless the page, the figures or the store changed since."""
        if browser is not self.browser or reader is not self.state.reader or number != browser.page_number:
            return
        ahead = ahead or {}
        vectors = {**ahead, **read_vectors(reader, ids, [name for name in browser.vectors if name not in ahead])}
        with pn.io.hold(self._doc):
            browser.deliver(number, vectors)
            self._mark_damaged()
            self.path = dataclasses.replace(self.path, sent_bytes=browser.sent_bytes)
            self._show_page_info()

    def _send_config(self) -> None:
        """Grids, snapping layer, page size and — for the browser path — function, sigmas, timing."""
        state, shown = self.state, list(self.specs)
        view = self._view
        assert view is not None
        extra = BrowserHover.config_columns(
            self.path, shown, {n: state.reader.geometry(n).dim for n in shown},
            {n: (*self.specs[n].gap_cells, self.specs[n].band_cells) for n in shown},
            view.function, state.sigmas(shown), state.topk_delay_ms, self.browser.page_number, self.browser.slot)
        self.shared.set_config(self.specs, view.active_layer, len(self.shown_images), extra)

    def _show_overlays(self, query: Query | None, force: bool = False) -> None:
        """The hover hot path: every shown layer's overlays for ``query``, one source per layer."""
        pinned = self.state.pinned
        if query == self._drawn and pinned == self._pinned and not force:
            return
        self._drawn, self._pinned = query, pinned
        if self.path.browser:  # the browser draws: it needs the query only when it cannot know it
            key = (query, pinned)
            if key != self._drawn_query:
                self._drawn_query = key
                self.browser.set_query(self.engine.query_vectors(query, [f.layer for f in self.figures])
                                       if query is not None else None, pinned=pinned)
            return
        maps = (self.engine.page_maps(query, self.state.valid_function, self.state.sigmas([f.layer for f in self.figures]))
                if query is not None else {})
        self._mark_damaged()
        n = len(self.shown_images)
        with pn.io.hold(self._doc):
            for fig in self.figures:
                fig.set_maps(maps.get(fig.layer), n)

    def _mark_damaged(self) -> None:
        """Caption the page's tiles "unreadable" as soon as a read finds them damaged (the
        vectors of a layer are read after the captions went out)."""
        ids = self.shown_images
        found = self.state.reader.damaged & set(ids.tolist())
        if found != self._damaged_shown:
            self._damaged_shown = found
            self.shared.set_labels(self.state.tile_captions(ids))

    def _show_pin(self) -> None:
        """Outline the pinned query on its tile in every layer, if its image is on the page."""
        q = self.state.current if self.state.pinned else None
        tiles = np.flatnonzero(self.shown_images == q.image) if q is not None else np.empty(0)
        rows = outline_rows((fig, int(tiles[0]), *self.state.mapped(q, fig.layer)) for fig in self.figures) \
            if q is not None and tiles.size else empty_columns(OUTLINE_COLUMNS)
        if rows != dict(self.shared.pin.data):
            self.shared.pin.data = rows

    @param.depends("state.cmap", "state.value_range", "state.sigma_scale", watch=True)
    def _on_colors(self) -> None:
        if self._view is None:
            return
        pal = palette(self.state.cmap)
        with pn.io.hold(self._doc):
            for fig in self.figures:
                fig.set_colors(pal, self.state.clim(fig.layer))
            self._send_config()
            self._show_overlays(self.state.current, force=True)

    @param.depends("state.alpha", watch=True)
    def _on_alpha(self) -> None:
        with pn.io.hold(self._doc):
            restyle(self.figures, alpha=self.state.alpha)

    @param.depends("state.captions", watch=True)
    def _on_captions(self) -> None:
        if len(self.shown_images):
            self.shared.set_labels(self.state.tile_captions(self.shown_images))

    # ============================================================================ pointer
    def _on_pointer(self, attr: str, old: Any, new: dict[str, list]) -> None:
        """The browser reports a new patch under the pointer, or a click (pin / unpin)."""
        if not self._nodelay:
            self._nodelay = True
            set_nodelay(self._doc)
        view = self._view
        if view is None:
            return
        hw = self.state.hw(view.active_layer)
        if pointer_cell(new, len(self.shown_images), hw) is None:  # serving hook (explorer/session.py)
            return  # a pointer row no page can write: bad types, off the page/grid
        if not new.get("tile") or new["tile"][0] < 0:
            return
        tile, y, x, click = (int(new[c][0]) for c in ("tile", "y", "x", "click"))
        if tile >= len(self.shown_images):
            return
        hovered = Query(int(self.shown_images[tile]), y, x, view.active_layer)
        if click != self._last_click:
            self._last_click = click
            self.state.click(hovered)
            return
        if self.state.query:
            return
        if self.path.browser and pointer_flag(new, "drawn"):  # the browser drew this query and keeps
            self._drawn_query = (hovered, False)  # it (js.py: E.rested): it is not sent back
        self.state.hover(hovered)
        # the browser path's message is already a rest; the server path waits for one
        self._after_rest(self.state.topk_delay_ms)
        self._read_ahead()  # a user who looks at the page is likely to page on (the first switch)

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
        self._show_overlays(self.state.current)

    def _after_rest(self, delay_ms: int) -> None:
        """(Re)start the rest timer (``delay_ms`` on the server path; at once on the browser
        path, whose message is the rest); the state's settled query follows when it fires."""
        self._scheduler.cancel(self._rest_timeout)
        self._rest_timeout = None
        if self.path.browser:
            # the browser's message is the rest: no move will follow to cancel it and none is
            # waiting to go first, so a busy loop must not defer it (the server path's timer
            # yields to moves; here that only made rests wait, seconds at 50 sessions)
            self._rest_timeout = self._scheduler.soon(self._on_rest, 0)
        else:
            self._rest_timeout = self._scheduler.later(self._on_rest, delay_ms)

    def _on_rest(self) -> None:
        self._rest_timeout = None
        self.state.rest()

    def on_load(self) -> None:
        """Once the browser is connected: send small websocket messages without Nagle delay, and
        give the browser path its query again (the page's first data fires no change event)."""
        self._nodelay = True
        set_nodelay(self._doc)
        if self.path.browser and self.state.current is not None:
            self._drawn_query = None
            self._show_overlays(self.state.current, force=True)

    # ============================================================================= export
    def export_png(self) -> io.BytesIO:
        """The current page as shown, as a PNG (what the download button serves): overlays, colour
        bars, the query's cell outlined on its tile, and for the groups overlay its colours and legend."""
        state, ids = self.state, self.shown_images
        pixels = state.reader.pixels(ids) if ids.size else np.zeros((0, 1, 1, 3), np.uint8)
        shown = [f.layer for f in self.figures]
        q = state.current
        maps = self.engine.page_maps(q, state.valid_function, state.sigmas(shown)) if q is not None else {}
        tile = np.flatnonzero(ids == q.image) if q is not None else np.empty(0)
        groups, legend = self.groups.export(ids)
        layers = {}
        for name in shown:
            cell = None
            if q is not None and tile.size:
                cell = (int(tile[0]), *state.mapped(q, name))
            layers[name] = ExportLayer(maps.get(name), state.clim(name), state.hw(name), cell,
                                       groups.get(name))
        view = self._view
        ncols = min(view.ncols, view.page_size) if view is not None else 1
        png = compose_grid_png(pixels, layers, palette(state.cmap), state.alpha, ncols,
                               state.tile_captions(ids), function=state.valid_function,
                               group_colors=GROUP_PALETTE, legend=legend)
        return io.BytesIO(png)
