"""Two models side by side: the same images, paired by content hash, hovered at the same place.

Two stores built from the same images with different models (say the default model and
``torchvision:resnet18``) share the images' content hashes (``table()["hash"]``), not their ids.
The "Compare models" tab shows a page of paired images once per store; hovering a location of
an image in either figure shows, in both, every image's similarity to the patch *at that image
location* in that store's layer. Locations travel in image coordinates, relative to the image
side (``u = px / S``, ``v = py / S``), so stores with different layer grids (14×14 vs 28×28) or
input sizes pair up: each store snaps the location to its own cell (:func:`relative_cell`, the
same arithmetic as the browser's outline in :data:`COMPARE_POINTER_JS`).

Pairing and the location maths are pure functions, unit tested without Panel.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource, CustomJS

from hoverlay.stores import ImageTable, StoreReader

from .engine import OverlayEngine, Query
from .figures import (
    CONFIG_COLUMNS,
    OUTLINE_COLUMNS,
    LayerFigure,
    SharedSources,
    empty_columns,
    grid_specs,
    palette,
)
from .kernels import color_range
from .resources import get_layer_stats, refresh_reader
from .state import ExplorerState
from .widgets import button, labelled

#: Columns of the compare pointer source: an outline row per figure plus the relative location.
POINTER_COLUMNS = (*OUTLINE_COLUMNS, "u", "v")
SIDES = ("A", "B")


# ------------------------------------------------------------------------------------ pure
def pair_by_hash(hashes_a: Sequence[str] | np.ndarray,
                 hashes_b: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``(ids_a, ids_b)`` of the images present in both stores, in the order of store a.

    ``ids_a[i]`` and ``ids_b[i]`` have the same content hash. An empty hash never pairs (callers
    blank failed images' hashes, see :func:`usable_hashes`); a hash repeated within one store
    pairs its first occurrence only, so each image appears in at most one pair.
    """
    first_b: dict[str, int] = {}
    for i, h in enumerate(hashes_b):
        if h and h not in first_b:
            first_b[str(h)] = i
    ids_a: list[int] = []
    ids_b: list[int] = []
    seen: set[str] = set()
    for i, h in enumerate(hashes_a):
        h = str(h)
        if h and h not in seen and h in first_b:
            seen.add(h)
            ids_a.append(i)
            ids_b.append(first_b[h])
    return np.asarray(ids_a, dtype=np.int64), np.asarray(ids_b, dtype=np.int64)


def usable_hashes(table: ImageTable) -> np.ndarray:
    """The hash column with failed images blanked (they have no vectors to compare)."""
    return np.where(table.ok, np.asarray(table["hash"], dtype=object), "")


def relative_cell(v: float, u: float, hw: tuple[int, int]) -> tuple[int, int]:
    """Cell (y, x) of an H×W map containing the image location (v, u) = (py / S, px / S) in [0, 1].

    The far edge (1.0) belongs to the last cell. Same arithmetic as the browser's, so the
    server's query patch is the one the outline shows.
    """
    h, w = hw
    return (min(h - 1, max(0, math.floor(v * h))), min(w - 1, max(0, math.floor(u * w))))


def pointer_location(data: dict[str, Sequence[Any]], n_tiles: int) -> tuple[int, float, float] | None:
    """``(tile, v, u)`` of the row the browser wrote to the compare pointer source, or None.

    The source is client input: a tile off the page, a location outside [0, 1] or values of the
    wrong type are dropped rather than clamped into a patch nobody pointed at.
    """
    try:
        tile, v, u = int(data["tile"][0]), float(data["v"][0]), float(data["u"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not (0 <= tile < n_tiles and 0.0 <= v <= 1.0 and 0.0 <= u <= 1.0):  # NaN fails too
        return None
    return tile, v, u


def store_pairs(readers: Sequence[StoreReader]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pair_by_hash` of two stores' ok images."""
    a, b = readers
    return pair_by_hash(usable_hashes(a.table()), usable_hashes(b.table()))


def find_compare_pair(urls: Sequence[str]) -> tuple[str, str] | None:
    """The first two stores (in the given order) that share at least one image, or None."""
    readers = [refresh_reader(u) for u in urls]
    for i in range(len(urls)):
        for j in range(i + 1, len(urls)):
            if store_pairs([readers[i], readers[j]])[0].size:
                return urls[i], urls[j]
    return None


# ----------------------------------------------------------------------------------- browser
#: CustomJS for mousemove on a compare figure. args: ptr, cfg (one row per figure), me (this row).
#: Finds the tile and the relative image location under the pointer, snaps it to every figure's
#: grid, and writes one outline row per figure, only when the tile or some figure's cell changed.
COMPARE_POINTER_JS = """
const ev = cb_obj, c = cfg.data;
if (ev.event_name === "mouseleave" || c.fig.length <= me) return;
const S = c.S[me], PX = c.px[me], PY = c.py[me], NC = c.ncols[me], NR = c.nrows[me];
const col = Math.floor(ev.x / PX), rb = Math.floor(ev.y / PY), row = NR - 1 - rb;
const t = row * NC + col;
const px = ev.x - col * PX, py = rb * PY + S - ev.y;
if (!(col >= 0 && col < NC && row >= 0 && row < NR && t < c.n[me] && px >= 0 && px <= S && py >= 0 && py <= S)) return;
const u = px / S, v = py / S;
const cells = [];
for (let i = 0; i < c.fig.length; i++) {
  cells.push([Math.min(c.H[i] - 1, Math.max(0, Math.floor(v * c.H[i]))),
              Math.min(c.W[i] - 1, Math.max(0, Math.floor(u * c.W[i])))]);
}
const d = ptr.data;
let same = d.tile.length === c.fig.length && d.tile[0] === t;
for (let i = 0; same && i < c.fig.length; i++) {
  same = d.fig[i] === c.fig[i] && d.y[i] === cells[i][0] && d.x[i] === cells[i][1];
}
if (same) return;
const out = {fig: [], tile: [], y: [], x: [], cx: [], cy: [], w: [], h: [], u: [], v: []};
for (let i = 0; i < c.fig.length; i++) {
  const Si = c.S[i], Hi = c.H[i], Wi = c.W[i], NCi = c.ncols[i];
  const x0 = (t % NCi) * c.px[i], ytop = (c.nrows[i] - 1 - Math.floor(t / NCi)) * c.py[i] + Si;
  out.fig.push(c.fig[i]); out.tile.push(t); out.y.push(cells[i][0]); out.x.push(cells[i][1]);
  out.cx.push(x0 + (cells[i][1] + 0.5) * Si / Wi); out.cy.push(ytop - (cells[i][0] + 0.5) * Si / Hi);
  out.w.push(Si / Wi); out.h.push(Si / Hi); out.u.push(u); out.v.push(v);
}
window.hoverlay_last_move = performance.now();
ptr.data = out;
"""


# -------------------------------------------------------------------------------------- view
@dataclass
class Side:
    """One store's half of the compare view."""

    key: str  # "A" or "B": figure and source names (compare:A, compare-overlay:A, ...)
    url: str
    reader: StoreReader
    ids: np.ndarray  # paired image ids of this store, pair order
    layer: str = ""
    figure: LayerFigure | None = None
    engine: OverlayEngine | None = None
    page_ids: np.ndarray | None = None

    @property
    def hw(self) -> tuple[int, int]:
        g = self.reader.geometry(self.layer)
        return g.height, g.width

    def describe(self) -> str:
        """'**A** googlenet.zarr: torchvision:googlenet (weights none)' (the full URL as a tooltip)."""
        spec = self.reader.model.get("spec", "?")
        weights = self.reader.model.get("weights")
        name = html.escape(self.url.rstrip("/").rsplit("/", 1)[-1])
        return (f'<b>{self.key}</b> <span title="{html.escape(self.url)}">{name}</span>: {html.escape(str(spec))}'
                + (f" (weights {html.escape(str(weights))})" if weights else ""))


class CompareView(pn.viewable.Viewer):
    """Paired images of two stores, one figure each, overlays of both following one hover."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")

    def __init__(self, url_a: str, url_b: str, **params: Any):
        super().__init__(**params)
        state = self.state
        self._doc = pn.state.curdoc
        readers = [refresh_reader(url_a), refresh_reader(url_b)]
        ids_a, ids_b = store_pairs(readers)
        self.sides = [Side("A", url_a, readers[0], ids_a), Side("B", url_b, readers[1], ids_b)]
        self.page = 0
        self.location: tuple[int, float, float] | None = None  # (tile, v, u) last hovered
        self.layer_selects = []
        for side in self.sides:  # start where the explorer's pointer snaps, if that store is A or B
            side.layer = state.active_layer if side.url == state.store else side.reader.layers[0]
            sel = pn.widgets.Select(**labelled(pn.widgets.Select, f"Layer of {side.key}"),
                                    options=side.reader.layers, value=side.layer, width=180)
            sel.param.watch(lambda e, side=side: self._set_layer(side, e.new), "value")
            self.layer_selects.append(sel)
        prev_b, next_b = button("◀ prev", width=70), button("next ▶", width=70)
        prev_b.on_click(lambda e: self.go(-1))
        next_b.on_click(lambda e: self.go(+1))
        self.page_info = pn.pane.Markdown("", margin=(8, 10))
        self.info = pn.pane.Markdown("", margin=(0, 10))
        self.status = pn.pane.HTML("", margin=(0, 10), css_classes=["compare-status"])
        self._figure_row = pn.Row()
        self.layout = pn.Column(
            self.info,
            pn.Row(*self.layer_selects, pn.Column(pn.Row(prev_b, next_b, self.page_info), margin=(18, 0, 0, 0))),
            self.status, self._figure_row, margin=(0, 0, 0, 16), name="Compare models")
        self.built = False

    def __panel__(self) -> pn.viewable.Viewable:
        return self.layout

    @param.depends("state.page_size", "state.ncols", "state.tile_px", watch=True)
    def _on_grid(self) -> None:
        if self.built:
            self._build()

    def activate(self) -> None:
        """Build the figures the first time the tab is shown (session start stays as fast as before)."""
        if not self.built:
            self._build()

    @property
    def n_pairs(self) -> int:
        return len(self.sides[0].ids)

    def _page_size(self) -> int:
        return max(1, self.state.page_size)

    def go(self, delta: int) -> None:
        last = max(0, math.ceil(self.n_pairs / self._page_size()) - 1)
        page = min(max(0, self.page + delta), last)
        if page != self.page:
            self.page = page
            self._build()

    def _set_layer(self, side: Side, layer: str) -> None:
        side.layer = layer
        self._build()

    def _build(self) -> None:
        """Figures for the current page of pairs (two stores, one layer each)."""
        state = self.state
        self.built = True
        size = self._page_size()
        self.page = min(self.page, max(0, math.ceil(self.n_pairs / size) - 1))  # the page size may have grown
        lo = self.page * size
        slots = max(1, min(size, self.n_pairs))  # a page never has more tiles than there are pairs
        ncols = min(state.ncols, slots)
        self.pointer = ColumnDataSource(empty_columns(POINTER_COLUMNS), name="compare-pointer")
        self.pointer.on_change("data", self._on_pointer)
        config = ColumnDataSource(empty_columns(CONFIG_COLUMNS), name="compare-config")
        pin = ColumnDataSource(empty_columns(OUTLINE_COLUMNS), name="compare-pin")
        specs, shareds = {}, []
        pal = palette(state.cmap)
        for i, side in enumerate(self.sides):
            side.page_ids = side.ids[lo:lo + size]
            s = side.reader.image_size
            spec = grid_specs({side.key: side.hw}, slots, ncols, s, state.tile_px, label_band=0.16)[side.key]
            specs[side.key] = spec
            own = SharedSources.create(f"compare-{side.key}")
            shared = SharedSources(rgb=own.rgb, labels=own.labels, pointer=self.pointer, pin=pin, config=config,
                                   selection=own.selection, policy=own.policy)
            shareds.append(shared)
            side.engine = OverlayEngine(side.reader, [side.layer])
            side.engine.set_page(side.page_ids)
            clim = color_range("cosine", nonnegative=get_layer_stats(side.url, side.layer).nonnegative)
            side.figure = LayerFigure(side.key, spec, shared, index=i, palette=pal, clim=clim, alpha=state.alpha,
                                      title=self._title(side), prefix="compare", hover=False,
                                      outline_source=self.pointer)
            side.figure.colorbar.title = "cosine"
            labels = side.reader.table()["label"]
            pixels = side.reader.pixels(side.page_ids) if side.page_ids.size else np.zeros((0, s, s, 3), np.uint8)
            shared.set_images({side.key: spec}, pixels, [f"#{j} {labels[j]}" for j in side.page_ids])
        shareds[0].set_config(specs, "A", len(self.sides[0].page_ids))
        for i, side in enumerate(self.sides):
            assert side.figure is not None
            cb = CustomJS(args={"ptr": self.pointer, "cfg": config, "me": i}, code=COMPARE_POINTER_JS)
            for event in ("mousemove", "tap"):
                side.figure.plot.js_on_event(event, cb)
        self._figure_row.objects = [
            pn.Column(pn.pane.HTML(side.describe(), margin=(0, 10)), pn.pane.Bokeh(side.figure.plot))
            for side in self.sides if side.figure is not None]
        pages = max(1, math.ceil(self.n_pairs / size))
        self.page_info.object = f"page **{self.page + 1}** / {pages} · {self.n_pairs} paired images"
        self.info.object = ("Images present in both stores (same content hash). Hover any image: both "
                            "stores show every image's similarity to the patch at that image location.")
        self.status.object = "Query: hover an image in either store"
        self.location = None

    def _title(self, side: Side) -> str:
        g = side.reader.geometry(side.layer)
        return f"{side.key} · {side.layer}  {g.height}×{g.width}×{g.dim}"

    @param.depends("state.cmap", "state.alpha", watch=True)
    def _on_colors(self) -> None:
        pal = palette(self.state.cmap)
        with pn.io.hold(self._doc):
            for side in self.sides:
                if side.figure is not None:
                    side.figure.set_colors(pal)
                    side.figure.set_alpha(self.state.alpha)

    # -------------------------------------------------------------------------------- hover
    def _on_pointer(self, attr: str, old: Any, new: dict[str, list]) -> None:
        page = self.sides[0].page_ids
        location = pointer_location(new, 0 if page is None else len(page))
        if location is not None:
            self.show(*location)

    def cells(self, v: float, u: float) -> list[tuple[int, int]]:
        """The patch each side's layer has at image location (v, u)."""
        return [relative_cell(v, u, side.hw) for side in self.sides]

    def show(self, tile: int, v: float, u: float) -> None:
        """Both stores' overlays for the patch at relative location (v, u) of pair ``tile``."""
        page = self.sides[0].page_ids
        if page is None or not 0 <= tile < len(page):
            return
        self.location = (tile, v, u)
        parts = []
        with pn.io.hold(self._doc):
            for side, (y, x) in zip(self.sides, self.cells(v, u), strict=True):
                assert side.engine is not None and side.figure is not None and side.page_ids is not None
                image = int(side.page_ids[tile])
                maps = side.engine.page_maps(Query(image, y, x, side.layer), "cosine")
                side.figure.set_maps(maps[side.layer], len(side.page_ids))
                s = side.reader.image_size
                parts.append(f"<b>{side.key}</b> #{image} patch ({y},{x}) of {side.layer} "
                             f"— image px (y {v * s:.0f}, x {u * s:.0f}) of {s}")
            self.status.object = "Query: " + " &nbsp;·&nbsp; ".join(parts)
