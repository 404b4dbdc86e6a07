"""Bokeh figures of the explorer, built once and then only fed new data.

One figure per shown layer holds the whole page. Every image of the page is a tile at a fixed
place (one ``ImageURL`` row each, a JPEG data URI sent once per page; all layer figures share
that source),
and the similarity maps of all tiles form **one** ``Image`` per layer: a mosaic of the page's
maps with transparent (NaN) gaps, aligned to the layer's cells. A hover therefore sends one
float32 array per layer, whatever the page size, under a colour mapper whose range never
changes.

Why not one HoloViews ``hv.RGB * hv.Image`` plot per tile, as first designed: rendering one such
overlay costs ~170 ms (a bare Bokeh figure with axes ~45 ms) on this project's 2-core machines,
so a page of 16 images x 3 layers took 8.7 s to open per session; and 48 per-tile arrays per
hover meant ~100 websocket frames per hover (each array is its own binary buffer), measured at
~25 ms of server time and ~70 ms more until the browser had them. The mosaic keeps what the
HoloViews design was for (images sent once, overlays updated in place, fixed colour mapping,
client-side outlines) with 3 buffers per hover.

Because the mosaic is aligned to each layer's cells, gaps and label bands are whole cells of
that layer, so tile spacing differs slightly between layer figures; the browser gets every
figure's spacing in the config source and maps positions between figures by tile, not by pixel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

import numpy as np
from bokeh.core.property.validation import validate
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import FIXED_HEIGHT_POLICY, FIXED_WIDTH_POLICY
from bokeh.models import (
    CDSView,
    ColorBar,
    ColumnDataSource,
    CustomJS,
    GroupFilter,
    Image,
    ImageURL,
    LinearColorMapper,
    NumeralTickFormatter,
    Plot,
    Range1d,
    Rect,
    Selection,
    Text,
    Title,
    UnionRenderers,
)
from holoviews.plotting.util import process_cmap

from . import jpeg
from .js import OVERLAY_CHANGED_JS, POINTER_JS

# Our plots have a fixed *frame* size and no outer width/height (the outer size follows from the
# colour bar and title); Bokeh's validator only knows outer sizes and would warn for every session.
silence(FIXED_WIDTH_POLICY, True)
silence(FIXED_HEIGHT_POLICY, True)

#: Columns of the pointer source (written by the browser) and of the outline sources.
POINTER_COLUMNS = ("fig", "tile", "y", "x", "cx", "cy", "w", "h", "click", "seq", "drawn")
OUTLINE_COLUMNS = ("fig", "tile", "y", "x", "cx", "cy", "w", "h")
CONFIG_COLUMNS = ("fig", "H", "W", "selected", "n", "px", "py", "ncols", "nrows", "S")


@dataclass(frozen=True)
class GridSpec:
    """Where each tile of a page sits in one layer figure's data space (image pixel units).

    Gaps between tiles and the caption band above each tile are whole cells of the layer
    (``hw``), so the page's maps form one cell-aligned mosaic. :func:`grid_specs` picks the cell
    counts so that, where the layers' grids allow it, all layer figures get the same spacing.
    """

    n_slots: int
    ncols: int
    image_size: int
    hw: tuple[int, int]
    tile_px: int = 110
    gap_cells: tuple[int, int] = (1, 1)  # (rows, cols) of cells between tiles
    band_cells: int = 0  # rows of cells above each tile for its caption

    # ------------------------------------------------------------------ cells
    @property
    def cell_w(self) -> float:
        return self.image_size / self.hw[1]

    @property
    def cell_h(self) -> float:
        return self.image_size / self.hw[0]

    # ----------------------------------------------------------------- layout
    @property
    def nrows(self) -> int:
        return max(1, math.ceil(self.n_slots / max(1, self.ncols)))

    @property
    def pitch_x(self) -> float:
        return self.image_size + self.gap_cells[1] * self.cell_w

    @property
    def pitch_y(self) -> float:
        return self.image_size + (self.gap_cells[0] + self.band_cells) * self.cell_h

    @property
    def band(self) -> float:
        return self.band_cells * self.cell_h

    @property
    def data_width(self) -> float:
        return self.ncols * self.pitch_x - self.gap_cells[1] * self.cell_w

    @property
    def data_height(self) -> float:
        return self.nrows * self.pitch_y - self.gap_cells[0] * self.cell_h

    def origin(self, tile: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bottom-left corner (x0, y0) of tile(s) in data space; tile row 0 is drawn at the top."""
        t = np.asarray(tile)
        col, row = t % self.ncols, t // self.ncols
        return col * self.pitch_x, (self.nrows - 1 - row) * self.pitch_y

    def outline(self, tile: int, y: int, x: int) -> dict[str, float]:
        """Centre and size of cell (y, x) of a tile in data space (for a Rect glyph)."""
        x0, y0 = self.origin(tile)
        s = self.image_size
        return {"cx": float(x0 + (x + 0.5) * self.cell_w), "cy": float(y0 + s - (y + 0.5) * self.cell_h),
                "w": self.cell_w, "h": self.cell_h}

    def config_row(self) -> dict[str, float]:
        """What the browser needs to find tiles and cells in this figure."""
        return {"H": self.hw[0], "W": self.hw[1], "px": self.pitch_x, "py": self.pitch_y,
                "ncols": self.ncols, "nrows": self.nrows, "S": float(self.image_size)}

    # ----------------------------------------------------------------- mosaic
    @property
    def mosaic_shape(self) -> tuple[int, int]:
        h, w = self.hw
        gy, gx = self.gap_cells
        return (self.nrows * (h + gy + self.band_cells) - gy, self.ncols * (w + gx) - gx)

    @cached_property
    def _scatter(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat (row, col) mosaic index of every cell of every slot, rows counted from the bottom."""
        h, w = self.hw
        gy, gx = self.gap_cells
        t = np.arange(self.n_slots)
        top = (t // self.ncols) * (h + gy + self.band_cells) + self.band_cells  # from the top
        left = (t % self.ncols) * (w + gx)
        rows = top[:, None, None] + np.arange(h)[None, :, None] + np.zeros((1, 1, w), np.int64)
        cols = left[:, None, None] + np.arange(w)[None, None, :] + np.zeros((1, h, 1), np.int64)
        rows = self.mosaic_shape[0] - 1 - rows  # Bokeh draws an image's row 0 at the bottom
        return rows.ravel(), cols.ravel()

    def mosaic(self, maps: np.ndarray | None, n: int) -> np.ndarray:
        """The first n tiles' maps (n, H, W) as one C-contiguous float32 image, NaN elsewhere."""
        out = np.full(self.mosaic_shape, np.nan, dtype=np.float32)
        if maps is not None and n:
            rows, cols = self._scatter
            m = n * self.hw[0] * self.hw[1]
            out[rows[:m], cols[:m]] = np.asarray(maps, dtype=np.float32).reshape(-1)[:m]
        return out


def grid_specs(hws: dict[str, tuple[int, int]], n_slots: int, ncols: int, image_size: int,
               tile_px: int, gap: float = 0.06, label_band: float = 0.0) -> dict[str, GridSpec]:
    """One :class:`GridSpec` per layer for a page, all with the same tiles.

    Spacing is a whole number of cells in every layer only if it is a multiple of
    ``S / gcd(H_1, H_2, ...)`` (rows; likewise columns). When that unit is small (grids like
    28/14/7: 32 px of 224), every figure gets the same spacing in image pixels and tiles line up
    across figures; otherwise (e.g. 14 and 10) each figure rounds the wanted spacing to its own
    cells.
    """
    def cells(frac: float, n_cells: int, common: int) -> int:
        unit = n_cells // common  # cells of this layer per common unit
        if unit * 5 <= n_cells:  # the common unit is at most a fifth of the image: use it
            return max(1, round(frac * common)) * unit
        return max(1, round(frac * n_cells))

    gcd_h = math.gcd(*(h for h, _ in hws.values()))
    gcd_w = math.gcd(*(w for _, w in hws.values()))
    out = {}
    for name, (h, w) in hws.items():
        gap_cells = (cells(gap, h, gcd_h), cells(gap, w, gcd_w))
        band = cells(label_band, h, gcd_h) if label_band > 0 else 0
        out[name] = GridSpec(n_slots, ncols, image_size, (h, w), tile_px, gap_cells, band)
    return out


# ---------------------------------------------------------------------------- encoding
def tile_uri(pixels: np.ndarray) -> str:
    """uint8 (S, S, 3) pixels (row 0 at the top) -> the tile as a JPEG data URI (explorer/jpeg.py:
    ~10x fewer bytes than the raw RGBA a page's tiles were sent as)."""
    return jpeg.data_uri(jpeg.encode(pixels))


@cache
def palette(name: str) -> tuple[str, ...]:
    """A colour map's 256 colours (names HoloViews resolves without matplotlib), each checked
    once here to be ``#rrggbb``: the mappers below are built without Bokeh's own check."""
    colors = tuple(process_cmap(name, 256))
    bad = [c for c in colors if not isinstance(c, str) or not _HEX_COLOR.fullmatch(c)]
    if bad:
        raise ValueError(f"colour map {name!r} gave colours that are not #rrggbb: {bad[:3]}")
    return colors


_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


def color_mapper(colors: Sequence[str], **props: Any) -> LinearColorMapper:
    """A ``LinearColorMapper`` over ``palette()``'s colours, built without Bokeh's property
    validation: it checks each of the 256 colours against its colour grammar again, ~3 ms a
    mapper, and a page has 12 (two per figure), i.e. ~35 ms of every page open."""
    with validate(False):
        return LinearColorMapper(palette=list(colors), **props)


def restyle(figures: Sequence[LayerFigure], palette: Sequence[str] | None = None,
            alpha: float | None = None) -> None:
    """A new colour map and/or overlay opacity for a view's figures (callers hold the document)."""
    for fig in figures:
        if palette is not None:
            fig.set_colors(palette)
        if alpha is not None:
            fig.set_alpha(alpha)


#: One-image views (the query patch, the query tile) draw their tile at least this wide.
MIN_TILE_PX = 150


def outline_rows(cells: Iterable[tuple[LayerFigure, int, int, int]]) -> dict[str, list]:
    """The columns of an outline source (:data:`OUTLINE_COLUMNS`) for ``(figure, tile, y, x)``
    cells: each figure draws only its own rows (the sources' ``fig`` filter)."""
    rows: dict[str, list] = empty_columns(OUTLINE_COLUMNS)
    for fig, tile, y, x in cells:
        for col, v in (("fig", fig.layer), ("tile", tile), ("y", y), ("x", x),
                       *fig.spec.outline(tile, y, x).items()):
            rows[col].append(v)
    return rows


def empty_columns(columns: Sequence[str]) -> dict[str, list]:
    return {c: [] for c in columns}


# ------------------------------------------------------------------------ shared sources
@dataclass
class SharedSources:
    """Sources all layer figures of a page read: images, captions, pointer, outlines, config."""

    rgb: ColumnDataSource  # page images (sent once per page); positions per figure: x:<layer>
    labels: ColumnDataSource  # tile captions, positions per figure
    pointer: ColumnDataSource  # written by the browser on patch change / click
    pin: ColumnDataSource  # outline of the pinned query (server-side)
    config: ColumnDataSource  # per figure: grid and layer geometry for the browser's snapping
    selection: Selection  # the one selection every source of the page shares (see source())
    policy: UnionRenderers

    @classmethod
    def create(cls, prefix: str = "grid") -> SharedSources:
        selection, policy = Selection(), UnionRenderers()

        def source(data: dict[str, list], name: str) -> ColumnDataSource:
            return ColumnDataSource(data, name=name, selected=selection, selection_policy=policy)

        return cls(
            rgb=source({"image": [], "dw": [], "dh": []}, f"{prefix}-rgb"),
            labels=source({"text": []}, f"{prefix}-labels"),
            pointer=source(empty_columns(POINTER_COLUMNS), f"{prefix}-pointer"),
            pin=source(empty_columns(OUTLINE_COLUMNS), f"{prefix}-pin"),
            config=source(empty_columns(CONFIG_COLUMNS), f"{prefix}-config"),
            selection=selection, policy=policy,
        )

    def source(self, data: dict[str, Any], **props: Any) -> ColumnDataSource:
        """Another source of the page, sharing the page's one ``Selection`` and selection policy.

        Nothing in the explorer selects (its figures have no selection tools), and the two models
        each source would own otherwise were 34 of a page's 271, each built, sent and set up in
        the browser: A/B on a 200-image v2 store (2 cores, medians of 16), page shown
        1.10 -> 1.07 s.
        """
        return ColumnDataSource(data, selected=self.selection, selection_policy=self.policy, **props)

    def set_images(self, specs: dict[str, GridSpec], pixels: np.ndarray,
                   captions: Sequence[str] | None = None) -> None:
        """Show a page of images (n, S, S, 3) in the first n tiles of every figure."""
        n = len(pixels)
        rgb: dict[str, list] = {"image": [tile_uri(p) for p in pixels]}
        labels: dict[str, list] = {"text": list(captions) if captions is not None else [""] * n}
        for layer, spec in specs.items():
            x0, y0 = spec.origin(np.arange(n))
            s = spec.image_size
            rgb.update({f"x:{layer}": x0.tolist(), f"y:{layer}": y0.tolist()})
            rgb["dw"], rgb["dh"] = [s] * n, [s] * n
            labels.update({f"x:{layer}": x0.tolist(), f"y:{layer}": (y0 + s + 0.15 * spec.band).tolist()})
        self.rgb.data = rgb
        self.labels.data = labels

    def set_labels(self, captions: Sequence[str]) -> None:
        """New captions for the tiles shown (same images, same places)."""
        data = dict(self.labels.data)
        if len(data.get("text", [])) == len(captions):
            data["text"] = list(captions)
            self.labels.data = data

    def set_config(self, specs: dict[str, GridSpec], selected: str, n: int,
                   extra: dict[str, list] | None = None) -> None:
        """Tell the browser every figure's grid, which layer snaps the pointer, and the page size
        (``extra``: more columns, one value per figure in ``specs`` order)."""
        rows: dict[str, list] = empty_columns(CONFIG_COLUMNS)
        for layer, spec in specs.items():
            row = {"fig": layer, "selected": int(layer == selected), "n": int(n), **spec.config_row()}
            for col in CONFIG_COLUMNS:
                rows[col].append(row[col])
        rows.update(extra or {})
        if rows != dict(self.config.data):
            self.config.data = rows


# --------------------------------------------------------------------------- figures
class LayerFigure:
    """One layer's view of a page: image tiles, their overlay mosaic, outlines and a colour bar."""

    def __init__(self, layer: str, spec: GridSpec, shared: SharedSources, *, index: int,
                 palette: Sequence[str], clim: tuple[float, float], alpha: float, title: str,
                 prefix: str = "grid", hover: bool = True, outline_source: ColumnDataSource | None = None,
                 pin: bool = True):
        self.layer, self.spec, self.shared = layer, spec, shared
        self.hw = spec.hw
        scale = spec.tile_px / spec.image_size
        frame_w, frame_h = max(40, round(spec.data_width * scale)), max(40, round(spec.data_height * scale))
        self.plot = Plot(
            x_range=Range1d(0, spec.data_width, bounds="auto"),
            y_range=Range1d(0, spec.data_height, bounds="auto"),
            # The frame size decides and stays fixed: a narrow window scrolls instead of squeezing
            # tiles out of square (the default policies let the flex layout shrink the frame).
            frame_width=frame_w, frame_height=frame_h, width=None, height=None,
            width_policy="fixed", height_policy="fixed",
            toolbar_location=None, min_border=4, outline_line_color=None, name=f"{prefix}:{layer}",
        )
        self.title = Title(text=title, text_font_size="12px")
        self.plot.title = self.title
        for src in (shared.rgb, shared.labels):  # position columns of this figure (filled per page)
            src.data.update({f"x:{layer}": [], f"y:{layer}": []} if not src.data.get(f"x:{layer}") else {})
        self.plot.add_glyph(shared.rgb, ImageURL(url="image", x=f"x:{layer}", y=f"y:{layer}", w="dw", h="dh",
                                                 anchor="bottom_left"))
        self.source = shared.source({"image": [spec.mosaic(None, 0)], "x": [0.0], "y": [0.0],
                                     "dw": [spec.data_width], "dh": [spec.data_height]},
                                    name=f"{prefix}-overlay:{layer}")
        self.source.js_on_change("data", CustomJS(code=OVERLAY_CHANGED_JS))
        self.mapper = color_mapper(palette, low=clim[0], high=clim[1], nan_color="rgba(0, 0, 0, 0)")
        self.glyph = Image(image="image", x="x", y="y", dw="dw", dh="dh", color_mapper=self.mapper,
                           global_alpha=alpha)
        # "overlay" level: the browser repaints only the overlay canvas layer when the maps or the
        # outlines change; the image tiles (primary layer) are painted again only on a page change.
        self.plot.add_glyph(self.source, self.glyph, level="overlay")
        if spec.band_cells > 0:
            self.plot.add_glyph(shared.labels, Text(x=f"x:{layer}", y=f"y:{layer}", text="text",
                                                    text_font_size="10px", text_baseline="bottom",
                                                    text_color="#333333"))
        if hover:
            self.add_outline(shared.pointer, "#ffffff")
        if pin:  # views that never show a pin (the query view) skip its four models per figure
            self.add_outline(shared.pin, "#ff3b30")
        if outline_source is not None:
            self.add_outline(outline_source, "#ffffff")
        # The colour bar gets a twin of the mapper: BokehJS re-lays-out a colour bar whenever its
        # mapper maps data ("metrics changed"), which turned every hover into a full repaint of the
        # figure (image tiles included: ~6 ms of a 9 ms paint per figure, measured in Chromium).
        self.bar_mapper = color_mapper(palette, low=clim[0], high=clim[1])
        # compact labels ("12.5k"): a dot product's range reaches thousands, and long labels were
        # cut off at the figure's edge
        self.colorbar = ColorBar(color_mapper=self.bar_mapper, width=8, padding=2, margin=4,
                                 formatter=NumeralTickFormatter(format="0.[00]a"),
                                 major_label_text_font_size="9px", title_text_font_size="9px")
        self.plot.add_layout(self.colorbar, "right")
        if hover:
            cb = CustomJS(args={"ptr": shared.pointer, "cfg": shared.config, "me": index}, code=POINTER_JS)
            for event in ("mousemove", "tap", "mouseleave"):
                self.plot.js_on_event(event, cb)

    def add_outline(self, source: ColumnDataSource, color: str) -> None:
        """A patch outline legible on any image: a dark halo under a bright line, this figure's rows only."""
        view = CDSView(filter=GroupFilter(column_name="fig", group=self.layer))
        for width, col, alpha in ((3.5, "#000000", 0.7), (1.5, color, 1.0)):
            self.plot.add_glyph(source, Rect(x="cx", y="cy", width="w", height="h", fill_alpha=0,
                                             line_color=col, line_width=width, line_alpha=alpha),
                                view=view, level="overlay")

    def set_maps(self, maps: np.ndarray | None, n: int) -> None:
        """Replace the overlays of the first n tiles (None: transparent, no query yet)."""
        self.source.data.update(image=[self.spec.mosaic(maps, n)])  # only the image column travels

    def set_colors(self, palette: Sequence[str] | None = None, clim: tuple[float, float] | None = None) -> None:
        for mapper in (self.mapper, self.bar_mapper):
            if palette is not None:
                with validate(False):  # palette() checked them (see color_mapper)
                    mapper.palette = list(palette)
            if clim is not None:
                mapper.update(low=float(clim[0]), high=float(clim[1]))

    def set_alpha(self, alpha: float) -> None:
        self.glyph.global_alpha = float(alpha)
