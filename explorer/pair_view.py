"""Two pinned queries side by side: A's and B's maps over the page, and their difference.

Shown while query B is pinned (``state.second``); A is the query shown (``state.current``: pinned,
or where the pointer last rested, so A can follow the pointer while B stays). Per shown
layer one row of three figures over the page's tiles: A, B and A − B (a diverging palette,
symmetric about 0). The maps are the same memoised products as the server hover path; the
figures are built when the pair first appears and only fed arrays afterwards.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import panel as pn
import param

from .engine import OverlayEngine, Query
from .figures import LayerFigure, SharedSources, grid_specs, palette, restyle
from .state import ExplorerState
from .text import as_plain_markdown

#: Palette of the difference figures: diverging, so A > B and B > A read apart.
DIFFERENCE_CMAP = "coolwarm"
ROLES = ("A", "B", "A − B")


def difference_range(clim: tuple[float, float]) -> tuple[float, float]:
    """Colour range of A − B for maps whose own range is ``clim``: symmetric, as wide as it."""
    span = float(clim[1]) - float(clim[0])
    return -span, span


class QueryPairView(pn.viewable.Viewer):
    """A, B and A − B per shown layer, over the page's tiles."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._doc = pn.state.curdoc
        self.figures: dict[str, list[LayerFigure]] = {}  # layer -> [A, B, A - B]
        self._built_for: tuple[Any, ...] | None = None
        self._shown: tuple[Any, ...] | None = None
        self.head = pn.pane.Markdown("", margin=(10, 10, 0, 10))
        self._rows = pn.Column(margin=0)
        self._layout = pn.Column(self.head, self._rows, margin=0, visible=False, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def query_a(self) -> Query | None:
        """A: the pinned query, else where the pointer last rested (the pair follows rests, not
        every move: on the server path each move would cost two page products more)."""
        return self.state.current if self.state.pinned else self.state.settled

    def maps(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per shown layer (A, B, A − B) maps of the page, ``(n, H, W)`` each; {} without a pair."""
        a, b, view = self.query_a(), self.state.second, self.state.view
        if a is None or b is None or view is None:
            return {}
        self.engine.set_page(view.page_ids)
        sigmas = self.state.sigmas(list(view.layers))
        ma = self.engine.page_maps(a, view.function, sigmas)
        mb = self.engine.page_maps(b, view.function, sigmas)
        return {name: (ma[name], mb[name], ma[name] - mb[name]) for name in view.layers}

    @param.depends("state.view", "state.settled", "state.pinned", "state.second", "state.cmap",
                   "state.value_range", "state.sigma_scale", watch=True)
    def _refresh(self) -> None:
        state, view = self.state, self.state.view
        a = self.query_a()
        pair = a is not None and state.second is not None
        if view is None or not pair:
            self._layout.visible = False
            self._shown = None
            return
        key = (view, a, state.second, state.cmap, state.value_range, state.sigma_scale)
        if key == self._shown:
            return
        with pn.io.hold(self._doc):
            if (view.grid, state.reader) != self._built_for:
                self._build()
            if self._ids != view.ids:
                ids = view.page_ids
                pixels = state.reader.pixels(ids) if ids.size else np.zeros((0, 1, 1, 3), np.uint8)
                self.shared.set_images(self.specs, pixels, state.tile_captions(ids))
                self._ids = view.ids
            n, pal = len(view.ids), palette(state.cmap)
            for name, (ma, mb, diff) in self.maps().items():
                clim = state.clim(name)
                for fig, values, rng, p in zip(self.figures[name], (ma, mb, diff),
                                               (clim, clim, difference_range(clim)), (pal, pal, None), strict=True):
                    fig.set_colors(p, rng)
                    fig.colorbar.title = view.function if fig is not self.figures[name][2] else "A − B"
                    fig.set_maps(values, n)
            b = state.second
            assert a is not None and b is not None
            self.head.object = (f"**Two queries**: A = {self._describe(a)}, B = {self._describe(b)} "
                                f"— their maps over this page and A − B (red: more like A, blue: more like B)")
            self._layout.visible = True
        self._shown = key

    def _describe(self, q: Query) -> str:
        return f"{as_plain_markdown(self.state.image_name(q.image))} ({q.y},{q.x}) in `{q.layer}`"

    def _build(self) -> None:
        state, view = self.state, self.state.view
        assert view is not None
        hws = {name: state.hw(name) for name in view.layers}
        ncols = min(view.ncols, view.page_size)
        self.specs = grid_specs(hws, view.page_size, ncols, state.reader.image_size, max(40, view.tile_px * 2 // 3),
                                label_band=0.16)
        self.shared = SharedSources.create("pair")
        pal, diverging = palette(state.cmap), palette(DIFFERENCE_CMAP)
        self.figures = {}
        rows = []
        for name in view.layers:
            clim = state.clim(name)
            figs = [LayerFigure(name, self.specs[name], self.shared, index=0, palette=p, clim=c, alpha=state.alpha,
                                title=f"{role} · {name}", prefix=f"pair{tag}", hover=False)
                    for role, tag, p, c in zip(ROLES, ("A", "B", "D"), (pal, pal, diverging),
                                               (clim, clim, difference_range(clim)), strict=True)]
            self.figures[name] = figs
            rows.append(pn.Row(*(pn.pane.Bokeh(f.plot) for f in figs), styles={"flex-wrap": "wrap"}))
        self._rows.objects = rows
        self.engine = OverlayEngine(state.reader, list(view.layers), external=state.external)
        self._built_for = (view.grid, state.reader)
        self._ids: tuple[int, ...] | None = None

    @param.depends("state.alpha", watch=True)
    def _on_alpha(self) -> None:
        with pn.io.hold(self._doc):
            restyle([f for figs in self.figures.values() for f in figs], alpha=self.state.alpha)
