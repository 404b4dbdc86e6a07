"""The "Transform sweep" tab: a base image, its rotated / rescaled copies, and how similar a patch stays.

One Bokeh figure per shown layer holds the base (tile 0) and its copies (the tile machinery of
:mod:`explorer.figures`). Hovering the base snaps to a patch client-side exactly as on the main
grid (only tile 0 is hoverable: the config says the page has one image); the server then sends,
in one message, every tile's similarity to that patch, the outline of the *corresponding* patch
on each copy (:func:`stores.transforms.map_patch`; no outline where it left the canvas) and the
charts' data (:func:`explorer.sweep.sweep_chart`): cosine vs angle and vs scale, one line per
shown layer. The view holds no numbers of its own; it copies what the pure functions return.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource, FixedTicker, Legend
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from .engine import OverlayEngine, Query
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
from .kernels import color_range
from .resources import get_layer_stats
from .state import ExplorerState
from .sweep import AXIS_LABELS, SweepSet, bases_with_copies, copy_cells, sweep_chart, sweep_set
from .widgets import labelled

#: Most bases listed in the base selector (a store may hold many swept images).
MAX_BASES_LISTED = 500


def has_sweeps(state: ExplorerState) -> bool:
    """Whether the state's store holds transformed copies (the tab is offered only then)."""
    return bases_with_copies(state.reader.table()).size > 0


class SweepView(pn.viewable.Viewer):
    """Base + copies per shown layer, corresponding patches outlined, similarity-vs-parameter charts."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._doc = pn.state.curdoc
        self.sweep: SweepSet | None = None
        self.figures: list[LayerFigure] = []
        self.curves: dict[str, ColumnDataSource] = {}
        self.cell: tuple[int, int] | None = None  # hovered base patch in the snapping layer
        self.base_select = pn.widgets.Select(**labelled(pn.widgets.Select, "Base image"), options={},
                                             width=240)
        self.info = pn.pane.Markdown("", margin=(24, 10, 0, 10))
        self._figure_col = pn.Column()
        self._chart_col = pn.Column()
        self.layout = pn.Column(
            pn.Row(self.base_select, self.info),
            pn.Row(self._figure_col, self._chart_col),
            margin=(0, 0, 0, 16), name="Transform sweep")
        self.built = self._refreshing = False
        self._built_for: tuple[Any, ...] | None = None
        self.base_select.param.watch(lambda e: self._refreshing or self._build(), "value")

    def __panel__(self) -> pn.viewable.Viewable:
        return self.layout

    @param.depends("state.view", watch=True)
    def _on_view(self) -> None:
        """Another store: its swept images; other layers, snapping layer or tile size: rebuilt."""
        view = self.state.view
        if not self.built or view is None or self._built_for is None:
            return
        if view.store != self._built_for[0]:
            self.refresh()
        elif (view.layers, view.active_layer, view.tile_px) != self._built_for[1:]:
            self._build()

    # -------------------------------------------------------------------------- state
    def activate(self) -> None:
        """Build the view the first time its tab is shown: a session that never opens it pays nothing."""
        if not self.built:
            self.refresh()

    def refresh(self) -> None:
        """(Re)read the store's swept images; keeps the chosen base when it still exists."""
        table = self.state.reader.table()
        bases = bases_with_copies(table)
        labels = table["label"]
        options = {f"#{b} {labels[b]} ({len(sweep_set(table, b).copies)} copies)": int(b)
                   for b in bases[:MAX_BASES_LISTED]}
        keep = self.base_select.value if self.base_select.value in options.values() else None
        self._refreshing = True  # not discard_events: that would also keep the browser's widget stale
        try:
            self.base_select.options = options
            self.base_select.value = keep if keep is not None else next(iter(options.values()), None)
        finally:
            self._refreshing = False
        self._build()

    def _build(self) -> None:
        """Figures and charts for the chosen base and the app's shown layers."""
        state, base = self.state, self.base_select.value
        self.cell = None
        self.built = True
        view = state.view
        self._built_for = (view.store, view.layers, view.active_layer, view.tile_px) if view is not None else None
        if base is None:
            self.sweep, self.figures, self.curves = None, [], {}
            self.info.object = "This store has no transformed copies (build it with `--rotate` / `--scale`)."
            self._figure_col.objects, self._chart_col.objects = [], []
            return
        reader = state.reader
        self.sweep = sweep = sweep_set(reader.table(), int(base))
        self.layers, self.snap = state.shown_layers(), state.active_layer
        ids = sweep.ids
        self.engine = OverlayEngine(reader, self.layers)
        self.engine.set_page(ids)
        hws = {name: (reader.geometry(name).height, reader.geometry(name).width) for name in self.layers}
        ncols = min(len(ids), max(4, math.ceil(math.sqrt(1.5 * len(ids)))))
        self.specs = grid_specs(hws, len(ids), ncols, reader.image_size, state.tile_px, label_band=0.16)
        self.shared = SharedSources.create("sweep")
        self.shared.pointer.on_change("data", self._on_pointer)
        self.mapped = ColumnDataSource(empty_columns(OUTLINE_COLUMNS), name="sweep-mapped")
        pal = palette(state.cmap)
        self.figures = [
            LayerFigure(name, self.specs[name], self.shared, index=i, palette=pal, clim=self._clim(name),
                        alpha=state.alpha, title=self._title(name), prefix="sweep", outline_source=self.mapped)
            for i, name in enumerate(self.layers)]
        for fig in self.figures:
            fig.colorbar.title = "cosine"
        self.shared.set_images(self.specs, reader.pixels(ids), [sweep.caption(t) for t in range(len(ids))])
        self.shared.set_config(self.specs, self.snap, 1)  # only tile 0, the base, is hoverable
        self.curves = {}
        charts = [self._chart(kind) for kind in AXIS_LABELS if kind in sweep.kinds]
        self._figure_col.objects = [pn.pane.Bokeh(f.plot) for f in self.figures]
        self._chart_col.objects = charts
        self.info.object = (f"Hover the base image (top left): every copy shows its similarity to that "
                            f"patch; the outline marks where the patch went. {len(sweep.copies)} copies.")

    def _chart(self, kind: str) -> pn.pane.Bokeh:
        """A line chart, cosine vs the transform's parameter, one line per shown layer."""
        src = ColumnDataSource({"param": [], **{layer: [] for layer in self.layers}}, name=f"sweep-curve:{kind}")
        self.curves[kind] = src
        params = sorted({p for k, p in zip(self.sweep.kinds, self.sweep.params, strict=True) if k == kind})
        ticks = [0.0, *params] if kind == "rotate" else [*params, 1.0]
        pad = 0.04 * (ticks[-1] - ticks[0] or 1.0)
        fig = figure(width=420, height=250, toolbar_location=None, name=f"sweep-chart:{kind}",
                     x_axis_label=AXIS_LABELS[kind], y_axis_label="cosine to the hovered patch",
                     title=f"similarity vs {kind}", x_range=(ticks[0] - pad, ticks[-1] + pad))
        fig.title.text_font_size = "12px"
        items = []
        for i, layer in enumerate(self.layers):
            color = Category10_10[i % len(Category10_10)]
            line = fig.line("param", layer, source=src, line_width=2, color=color)
            dots = fig.scatter("param", layer, source=src, size=6, color=color)
            items.append((layer, [line, dots]))
        # above the frame, not inside: a legend must never hide a point of the curve
        fig.add_layout(Legend(items=items, label_text_font_size="10px", orientation="horizontal",
                              border_line_alpha=0, margin=0, padding=2), "above")
        fig.xaxis.ticker = FixedTicker(ticks=ticks)
        fig.xaxis.major_label_overrides = {t: f"{t:g}" for t in ticks}
        return pn.pane.Bokeh(fig)

    def _clim(self, layer: str) -> tuple[float, float]:
        return color_range("cosine", nonnegative=get_layer_stats(str(self.state.store), layer).nonnegative)

    def _title(self, layer: str) -> str:
        g = self.state.reader.geometry(layer)
        mark = "  ◆ pointer snaps here" if layer == self.snap else ""
        return f"{layer}  {g.height}×{g.width}×{g.dim}{mark}"

    @param.depends("state.cmap", "state.alpha", watch=True)
    def _on_colors(self) -> None:
        with pn.io.hold(self._doc):
            restyle(self.figures, palette(self.state.cmap), self.state.alpha)

    # -------------------------------------------------------------------------- hover
    def _on_pointer(self, attr: str, old: Any, new: dict[str, list]) -> None:
        """The browser's pointer row: only tile 0 (the base) and a cell of the snapping layer count.

        The source is client input: anything else (bad types, another tile, off the grid) is dropped.
        """
        try:
            tile, y, x = (int(new[c][0]) for c in ("tile", "y", "x"))
        except (KeyError, IndexError, TypeError, ValueError):
            return
        g = self.state.reader.geometry(self.snap)
        if tile == 0 and 0 <= y < g.height and 0 <= x < g.width:
            self.show(y, x)

    def show(self, y: int, x: int) -> None:
        """Overlays, copy outlines and charts for base patch (y, x) of the snapping layer."""
        sweep = self.sweep
        if sweep is None:
            return
        self.cell = (y, x)
        query = Query(sweep.base, y, x, self.snap)
        maps = self.engine.page_maps(query, "cosine")
        cells = {layer: self.engine.mapped(query, layer) for layer in self.layers}
        vectors = {}
        for layer in self.layers:
            blk = self.engine.block(layer)
            vectors[layer] = blk.vectors.reshape(*blk.shape, blk.dim)  # float32 view of the stored vectors
        chart = sweep_chart(vectors, sweep, cells)
        rows = outline_rows((fig, tile, *cell) for fig in self.figures
                            for tile, cell in enumerate(copy_cells(sweep, *cells[fig.layer], fig.hw), start=1)
                            if cell is not None)
        n = len(sweep.ids)
        with pn.io.hold(self._doc):
            for fig in self.figures:
                fig.set_maps(maps[fig.layer], n)
                fig.title.text = f"{self._title(fig.layer)} · patch {cells[fig.layer]}"
            self.mapped.data = rows
            for kind, src in self.curves.items():
                src.data = {k: np.asarray(v, dtype=np.float64) for k, v in chart[kind].items()}

