"""The query-patch view: the settled query's image in every shown layer, the mapped cell outlined.

It follows :attr:`ExplorerState.settled` (the pointer rested, or a pin), not every move. Its
figures' Bokeh models are made once the page has loaded and the session is idle (:meth:`prepare`)
and join the page with the first query: no empty colour bars stand on the page before there is
anything to show, the browser builds nothing it does not show, and the first rest pays only for
sending them. Building them took ~0.3 s of the server's loop per session, which made the first
rests of 50 sessions opened together wait for each other's builds (160 of 258 rests answered
within 10 s; 435 of 480 with the models made ahead). Sending them hidden ahead as well answered
644 of 644, but the browser then built the hidden figures while the user hovered: one pointer
move took 232 ms to paint (p99 of one session; 21 ms without).

So the first query does not send them at once: it asks again through a timer that yields to a
busy loop (:meth:`Scheduler.later`), and the rest's top-k — the answer the user waits for, cheap
to send — goes out first. 49 sessions resting together right after opening each sent ~0.25 s
of figure models before any top-k: every first top-k came at ~14 s, all at once.
"""

from __future__ import annotations

from html import escape
from typing import Any

import panel as pn
import param
from bokeh.models import ColumnDataSource

from .engine import OverlayEngine, Query
from .figures import (
    MIN_TILE_PX,
    OUTLINE_COLUMNS,
    LayerFigure,
    SharedSources,
    empty_columns,
    grid_specs,
    outline_rows,
    palette,
    restyle,
)
from .session import Scheduler
from .state import ExplorerState

HINT = "<b>Query patch in every shown layer</b>: hover a patch"
#: how long after the page loaded the figures' models are made (a busy loop defers it further)
PREPARE_DELAY_MS = 1000
#: How long the first query waits before its figures join the page (re-armed while the loop is busy).
FIRST_SHOW_DELAY_MS = 150


class QueryPatchView(pn.viewable.Viewer):
    """One figure per shown layer holding the settled query's image and its self-similarity."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._doc = pn.state.curdoc
        self.figures: list[LayerFigure] = []
        self._built_for: tuple[Any, ...] | None = None
        self._image = -1
        self._first_pending = False
        self.mapped_source = ColumnDataSource(empty_columns(OUTLINE_COLUMNS), name="query-mapped")
        self.head = pn.pane.HTML(HINT, margin=(10, 10, 0, 10))  # HTML: no Markdown render a rest
        self._row = pn.Row(styles={"flex-wrap": "wrap", "gap": "4px 12px"}, sizing_mode="stretch_width",
                           visible=False)
        self._layout = pn.Column(self.head, self._row, margin=0, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    @param.depends("state.settled", "state.view", watch=True)
    def _refresh(self) -> None:
        view, query = self.state.view, self.state.settled
        if view is None:
            return
        key = (view.grid, self.state.reader)
        if key != self._built_for and self.figures:  # other layers or tiles: built again when needed
            self._drop()
        if query is None:
            if self._built_for is None:
                self.head.object = HINT
            return
        self.show(query)

    def prepare_later(self, delay_ms: int = PREPARE_DELAY_MS) -> None:
        """Make the figures once the session has been idle for a while after loading."""
        Scheduler(self._doc).later(self.prepare, delay_ms)

    def prepare(self) -> None:
        """Make the figures for the current view now; they join the page with the first query."""
        if self.figures or self.state.view is None:
            return
        self._build()

    def _drop(self) -> None:
        self.figures, self._built_for, self._image = [], None, -1
        self._row.objects, self._row.visible = [], False
        self.head.object = HINT

    def _build(self) -> None:
        state, view = self.state, self.state.view
        assert view is not None
        hws = {name: state.hw(name) for name in view.layers}
        self.specs = grid_specs(hws, 1, 1, state.reader.image_size, max(view.tile_px, MIN_TILE_PX))
        self.shared = SharedSources.create("query")
        pal = palette(state.cmap)
        self.figures = [
            LayerFigure(name, self.specs[name], self.shared, index=i, palette=pal, clim=state.clim(name),
                        alpha=state.alpha, title=name, prefix="query", hover=False, pin=False,
                        outline_source=self.mapped_source)
            for i, name in enumerate(view.layers)]
        self.engine = OverlayEngine(state.reader, list(view.layers), external=state.external)
        self._built_for = (view.grid, state.reader)
        self._image = -1

    def show(self, query: Query, attach: bool = False) -> None:
        """The query image in every shown layer, its self-similarity, the mapped patch outlined."""
        state = self.state
        view = state.view
        assert view is not None
        scheduler = Scheduler(self._doc)
        if not self._row.objects and not attach and not scheduler.synchronous:  # figures not on the page
            if not self._first_pending:
                self._first_pending = True
                scheduler.later(self._show_first, FIRST_SHOW_DELAY_MS)
            return
        with pn.io.hold(self._doc):
            if not self.figures:
                self._build()
            if not self._row.objects:  # made ahead (prepare), or just now: onto the page
                self._row.objects = [pn.pane.Bokeh(f.plot) for f in self.figures]
            if query.image != self._image:
                self.shared.set_images(self.specs, state.image_pixels(query.image))
                self._image = query.image
            maps = self.engine.image_maps(query.image, query, view.function, state.sigmas(list(view.layers)))
            cells = {fig.layer: state.mapped(query, fig.layer) for fig in self.figures}
            for fig in self.figures:
                fig.set_colors(clim=state.clim(fig.layer))
                fig.colorbar.title = view.function
                fig.set_maps(maps[fig.layer], 1)
                y, x = cells[fig.layer]
                fig.title.text = f"{fig.layer} ({y},{x})"  # short: the figure is one tile wide
            self.mapped_source.data = outline_rows((fig, 0, *cells[fig.layer]) for fig in self.figures)
            self.head.object = (f"<b>Query patch in every shown layer</b>: "
                                f"{escape(state.image_name(query.image))} "
                                f"(outline: the cell it maps to in each layer)")
            self._row.visible = True

    def _show_first(self) -> None:
        """The first query's figures join the page (the timer of :meth:`show`)."""
        self._first_pending = False
        query = self.state.settled
        if query is None or self.state.view is None:
            return
        self.show(query, attach=True)

    @param.depends("state.cmap", "state.value_range", "state.sigma_scale", watch=True)
    def _on_colors(self) -> None:
        if not self.figures:
            return
        pal = palette(self.state.cmap)
        with pn.io.hold(self._doc):
            for fig in self.figures:
                fig.set_colors(pal, self.state.clim(fig.layer))
            if self.state.settled is not None:
                self.show(self.state.settled)

    @param.depends("state.alpha", watch=True)
    def _on_alpha(self) -> None:
        with pn.io.hold(self._doc):
            restyle(self.figures, alpha=self.state.alpha)
