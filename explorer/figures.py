"""Bokeh figures of the explorer, built once and then only fed new data.

One figure per shown layer holds the whole page: every image of the page is a tile at a fixed
place in data space (an ``ImageRGBA`` glyph row, sent once per page) under an ``Image`` glyph
row holding its similarity map (fixed ``clim``: the colour mapper never changes during hovers).
A hover therefore changes one ``ColumnDataSource`` per layer, whatever the page size.

Why not one HoloViews ``hv.RGB * hv.Image`` plot per tile, as first designed: rendering one such
overlay costs ~170 ms (and a plain Bokeh figure with axes ~45 ms) on this project's 2-core
machines, so a page of 16 images x 3 layers took 8.7 s to open per browser session, and every
hover updated 48 sources. Drawing the page of a layer as rows of one glyph keeps what the
HoloViews design was for (each image sent once, overlays updated in place, fixed colour
mapping, client-side outlines) at ~1/20 of the session start cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from bokeh.models import (
    CDSView,
    ColorBar,
    ColumnDataSource,
    CustomJS,
    GroupFilter,
    Image,
    ImageRGBA,
    LinearColorMapper,
    Plot,
    Range1d,
    Rect,
    Text,
    Title,
)

from .js import OVERLAY_CHANGED_JS, POINTER_JS

#: Columns of the pointer source (written by the browser) and of the outline sources.
POINTER_COLUMNS = ("fig", "tile", "y", "x", "cx", "cy", "w", "h", "click")
OUTLINE_COLUMNS = ("fig", "tile", "y", "x", "cx", "cy", "w", "h")


@dataclass(frozen=True)
class GridSpec:
    """Where each tile of a page sits in a layer figure's data space (image pixel units)."""

    n_slots: int
    ncols: int
    image_size: int
    tile_px: int = 120
    gap: float = 0.06  # fraction of the image size between tiles
    label_band: float = 0.0  # fraction of the image size above each tile for its label

    @property
    def nrows(self) -> int:
        return max(1, math.ceil(self.n_slots / max(1, self.ncols)))

    @property
    def pitch_x(self) -> float:
        return self.image_size * (1 + self.gap)

    @property
    def pitch_y(self) -> float:
        return self.image_size * (1 + self.gap + self.label_band)

    @property
    def data_width(self) -> float:
        return self.ncols * self.pitch_x - self.gap * self.image_size

    @property
    def data_height(self) -> float:
        return self.nrows * self.pitch_y - self.gap * self.image_size

    def origin(self, tile: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bottom-left corner (x0, y0) of tile(s) in data space; row 0 is drawn at the top."""
        t = np.asarray(tile)
        col, row = t % self.ncols, t // self.ncols
        return col * self.pitch_x, (self.nrows - 1 - row) * self.pitch_y

    def js_spec(self) -> dict[str, float]:
        return {"S": float(self.image_size), "px": self.pitch_x, "py": self.pitch_y,
                "ncols": self.ncols, "nrows": self.nrows}

    def outline(self, tile: int, y: int, x: int, hw: tuple[int, int]) -> dict[str, float]:
        """Centre and size of cell (y, x) of tile ``tile`` in data space (for a Rect glyph)."""
        h, w = hw
        x0, y0 = self.origin(tile)
        s = self.image_size
        return {"cx": float(x0 + (x + 0.5) * s / w), "cy": float(y0 + s - (y + 0.5) * s / h),
                "w": s / w, "h": s / h}


# ---------------------------------------------------------------------------- encoding
def rgba_image(pixels: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3) pixels -> (S, S) uint32 RGBA with row 0 at the bottom, as Bokeh draws it."""
    px = np.asarray(pixels, dtype=np.uint8)
    rgba = np.empty((*px.shape[:2], 4), dtype=np.uint8)
    rgba[..., :3] = px[::-1]
    rgba[..., 3] = 255
    return rgba.view(np.uint32).reshape(px.shape[:2])


def bokeh_maps(maps: np.ndarray) -> list[np.ndarray]:
    """(n, H, W) maps -> n C-contiguous float32 arrays flipped for Bokeh (binary over the wire)."""
    flipped = np.ascontiguousarray(np.asarray(maps, dtype=np.float32)[:, ::-1, :])
    return list(flipped)


def empty_columns(columns: Sequence[str]) -> dict[str, list]:
    return {c: [] for c in columns}


# ------------------------------------------------------------------------ shared sources
@dataclass
class SharedSources:
    """Sources every layer figure of a grid reads: one page of images, pointer, outlines."""

    rgb: ColumnDataSource  # page images, sent once per page
    labels: ColumnDataSource  # tile captions
    pointer: ColumnDataSource  # written by the browser on patch change / click
    pin: ColumnDataSource  # outline of the pinned query (server-side)
    config: ColumnDataSource  # layer geometries for the browser's snapping

    @classmethod
    def create(cls, prefix: str = "grid") -> SharedSources:
        pointer = ColumnDataSource(empty_columns(POINTER_COLUMNS), name=f"{prefix}-pointer")
        return cls(
            rgb=ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name=f"{prefix}-rgb"),
            labels=ColumnDataSource({"x": [], "y": [], "text": []}, name=f"{prefix}-labels"),
            pointer=pointer,
            pin=ColumnDataSource(empty_columns(OUTLINE_COLUMNS), name=f"{prefix}-pin"),
            config=ColumnDataSource({"fig": [], "H": [], "W": [], "selected": [], "n": []},
                                    name=f"{prefix}-config"),
        )

    def set_images(self, spec: GridSpec, pixels: np.ndarray, captions: Sequence[str] | None = None) -> None:
        """Show a page of images (n, S, S, 3) in the first n tiles."""
        n = len(pixels)
        x0, y0 = spec.origin(np.arange(n))
        s = spec.image_size
        self.rgb.data = {"image": [rgba_image(p) for p in pixels], "x": x0.tolist(), "y": y0.tolist(),
                         "dw": [s] * n, "dh": [s] * n}
        if spec.label_band > 0 and captions is not None:
            self.labels.data = {"x": x0.tolist(), "y": (y0 + s * (1 + spec.label_band * 0.15)).tolist(),
                                "text": list(captions)}

    def set_config(self, layers: Sequence[str], hws: Sequence[tuple[int, int]], selected: str, n: int) -> None:
        """Tell the browser the shown layers' grids, which one snaps the pointer, and the page size."""
        self.config.data = {"fig": list(layers), "H": [h for h, _ in hws], "W": [w for _, w in hws],
                            "selected": [int(name == selected) for name in layers],
                            "n": [int(n)] * len(layers)}


# --------------------------------------------------------------------------- figures
class LayerFigure:
    """One layer's view of a page: image tiles, their overlays, outlines and a colour bar."""

    def __init__(self, layer: str, hw: tuple[int, int], spec: GridSpec, shared: SharedSources, *,
                 palette: Sequence[str], clim: tuple[float, float], alpha: float, title: str,
                 prefix: str = "grid", hover: bool = True, outline_source: ColumnDataSource | None = None):
        self.layer, self.hw, self.spec, self.shared = layer, hw, spec, shared
        s = spec.image_size
        scale = spec.tile_px / s
        self.plot = Plot(
            x_range=Range1d(0, spec.data_width, bounds="auto"),
            y_range=Range1d(0, spec.data_height, bounds="auto"),
            frame_width=max(40, round(spec.data_width * scale)),
            frame_height=max(40, round(spec.data_height * scale)),
            toolbar_location=None, min_border=4, outline_line_color=None,
            name=f"{prefix}:{layer}",
        )
        self.plot.title = Title(text=title, text_font_size="12px")
        self.plot.add_glyph(shared.rgb, ImageRGBA(image="image", x="x", y="y", dw="dw", dh="dh"))
        self.source = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []},
                                       name=f"{prefix}-overlay:{layer}")
        self.source.js_on_change("data", CustomJS(code=OVERLAY_CHANGED_JS))
        self.mapper = LinearColorMapper(palette=list(palette), low=clim[0], high=clim[1],
                                        nan_color="rgba(0, 0, 0, 0)")
        self.glyph = Image(image="image", x="x", y="y", dw="dw", dh="dh", color_mapper=self.mapper,
                           global_alpha=alpha)
        self.plot.add_glyph(self.source, self.glyph)
        if spec.label_band > 0:
            self.plot.add_glyph(shared.labels, Text(x="x", y="y", text="text", text_font_size="10px",
                                                    text_baseline="bottom", text_color="#333333"))
        view = CDSView(filter=GroupFilter(column_name="fig", group=layer))
        if hover:
            self._outline(shared.pointer, view, "#ffffff", "solid")
        self._outline(shared.pin, CDSView(filter=GroupFilter(column_name="fig", group=layer)),
                      "#ff3b30", "solid")
        if outline_source is not None:
            self._outline(outline_source, CDSView(filter=GroupFilter(column_name="fig", group=layer)),
                          "#ffffff", "solid")
        self.colorbar = ColorBar(color_mapper=self.mapper, width=8, padding=2, margin=4,
                                 major_label_text_font_size="9px", title_text_font_size="9px")
        self.plot.add_layout(self.colorbar, "right")
        if hover:
            cb = CustomJS(args={"ptr": shared.pointer, "cfg": shared.config, "spec": spec.js_spec()},
                          code=POINTER_JS)
            for event in ("mousemove", "tap", "mouseleave"):
                self.plot.js_on_event(event, cb)

    def _outline(self, source: ColumnDataSource, view: CDSView, color: str, dash: str) -> None:
        """A patch outline legible on any image: a dark halo under a bright line."""
        for width, col, alpha in ((3.5, "#000000", 0.7), (1.5, color, 1.0)):
            self.plot.add_glyph(source, Rect(x="cx", y="cy", width="w", height="h", fill_alpha=0,
                                             line_color=col, line_width=width, line_alpha=alpha,
                                             line_dash=dash), view=view)

    def set_maps(self, maps: np.ndarray | None, n: int) -> None:
        """Replace the overlays of the first n tiles (None: transparent, no query yet)."""
        h, w = self.hw
        if maps is None:
            maps = np.full((n, h, w), np.nan, dtype=np.float32)
        if len(self.source.data["image"]) == n:
            self.source.data.update(image=bokeh_maps(maps))  # only the image column travels
            return
        x0, y0 = self.spec.origin(np.arange(n))
        s = self.spec.image_size
        self.source.data = {"image": bokeh_maps(maps), "x": x0.tolist(), "y": y0.tolist(),
                            "dw": [s] * n, "dh": [s] * n}

    def set_colors(self, palette: Sequence[str] | None = None, clim: tuple[float, float] | None = None) -> None:
        if palette is not None:
            self.mapper.palette = list(palette)
        if clim is not None:
            self.mapper.update(low=float(clim[0]), high=float(clim[1]))

    def set_alpha(self, alpha: float) -> None:
        self.glyph.global_alpha = float(alpha)
