"""PNG export of the current grid, composed on the server with the figures' own colours.

Bokeh's ``export_png`` needs Selenium and a webdriver; composing the picture from the arrays
the figures show (same palette, colour range and opacity, nearest-neighbour upsampling like the
``Image`` glyph) needs only Pillow and gives the same picture at the images' full resolution.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw


def palette_rgb(palette: Sequence[str]) -> np.ndarray:
    """Hex colours ('#rrggbb') -> uint8 (n, 3)."""
    return np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in palette], dtype=np.uint8)


def colorize(values: np.ndarray, clim: tuple[float, float], palette: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Map values to palette colours like Bokeh's LinearColorMapper: (rgb uint8, valid mask)."""
    lut = palette_rgb(palette)
    lo, hi = clim
    v = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(v)
    t = np.clip((np.nan_to_num(v, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    idx = np.minimum((t * len(lut)).astype(np.int64), len(lut) - 1)
    return lut[idx], valid


def blend_tile(pixels: np.ndarray, sim: np.ndarray | None, clim: tuple[float, float],
               palette: Sequence[str], alpha: float) -> np.ndarray:
    """One tile: the image with its similarity map drawn over it (nearest-neighbour upsampled)."""
    img = np.asarray(pixels, dtype=np.float32)
    if sim is None:
        return img.astype(np.uint8)
    s = img.shape[0]
    h, w = sim.shape
    rows = np.minimum((np.arange(s) * h) // s, h - 1)
    cols = np.minimum((np.arange(s) * w) // s, w - 1)
    rgb, valid = colorize(sim[np.ix_(rows, cols)], clim, palette)
    a = alpha * valid[..., None]
    return (img * (1 - a) + rgb.astype(np.float32) * a).round().astype(np.uint8)


@dataclass(frozen=True)
class ExportLayer:
    """What one layer's grid shows: its maps, colour range and grid, the query's cell, groups."""

    maps: np.ndarray | None  # (n, H, W) similarity, None before any query
    clim: tuple[float, float]
    hw: tuple[int, int]
    query_cell: tuple[int, int, int] | None = None  # (tile, y, x) of the query in this layer
    groups: np.ndarray | None = None  # (n, H, W) group per patch (-1: none), drawn instead of maps


def _label(v: float) -> str:
    """Compact colour-bar labels, as the figures show them (12.5k)."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}m"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


def colorbar_image(clim: tuple[float, float], palette: Sequence[str], height: int, width: int = 10) -> np.ndarray:
    """A vertical colour bar (high at the top), uint8 (height, width, 3)."""
    ramp = np.linspace(clim[1], clim[0], max(1, height))
    rgb, _ = colorize(ramp, clim, palette)
    return np.repeat(rgb[:, None, :], width, axis=1)


def compose_grid_png(pixels: np.ndarray, layers: Mapping[str, ExportLayer], palette: Sequence[str], alpha: float,
                     ncols: int, captions: Sequence[str] | None = None, gap: int = 6, *, function: str = "cosine",
                     group_colors: Sequence[str] = (), legend: Sequence[tuple[str, str]] = ()) -> bytes:
    """PNG of the page as the explorer shows it: one grid per layer (``ncols`` tiles wide) with its
    colour bar (labelled with the function), the query's cell outlined, groups coloured where the
    groups overlay is on, and a legend of ``(colour, text)`` entries below."""
    n = len(pixels)
    s = int(pixels.shape[1]) if n else 1
    ncols = max(1, min(ncols, n or 1))
    nrows = max(1, -(-n // ncols))
    band = 14 if captions else 0
    bar_w, bar_text = 10, 44
    grid_w = ncols * (s + gap) - gap
    grid_h = nrows * (s + gap + band) - gap
    block_w = grid_w + gap + bar_w + bar_text
    title = 16
    legend_h = 18 * (-(-len(legend) // 6)) + (6 if legend else 0)
    width = max(1, len(layers) * (block_w + 2 * gap) - 2 * gap)
    canvas = PILImage.new("RGB", (width, grid_h + title + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for li, (name, layer) in enumerate(layers.items()):
        ox = li * (block_w + 2 * gap)
        h, w = layer.hw
        draw.text((ox, 2), name, fill=(0, 0, 0))
        for i in range(n):
            r, c = divmod(i, ncols)
            x, y = ox + c * (s + gap), title + r * (s + gap + band)
            if captions:
                draw.text((x, y), captions[i], fill=(40, 40, 40))
            if layer.groups is not None and group_colors:
                tile = blend_groups(pixels[i], layer.groups[i], group_colors, max(0.5, alpha))
            else:
                sim = None if layer.maps is None else layer.maps[i]
                tile = blend_tile(pixels[i], sim, layer.clim, palette, alpha)
            canvas.paste(PILImage.fromarray(tile), (x, y + band))
            if layer.query_cell is not None and layer.query_cell[0] == i:
                _, qy, qx = layer.query_cell
                box = (x + qx * s / w, y + band + qy * s / h, x + (qx + 1) * s / w - 1, y + band + (qy + 1) * s / h - 1)
                draw.rectangle(box, outline=(0, 0, 0), width=3)
                draw.rectangle(box, outline=(255, 59, 48), width=1)
        bx = ox + grid_w + gap
        canvas.paste(PILImage.fromarray(colorbar_image(layer.clim, palette, grid_h, bar_w)), (bx, title))
        for frac, value in ((0.0, layer.clim[1]), (0.5, sum(layer.clim) / 2), (1.0, layer.clim[0])):
            ty = title + frac * (grid_h - 10)
            draw.text((bx + bar_w + 3, ty), _label(value), fill=(40, 40, 40))
        draw.text((bx, 2), function, fill=(90, 90, 90))
    for j, (color, text) in enumerate(legend):
        r, c = divmod(j, 6)
        x, y = c * 120, grid_h + title + 6 + r * 18
        draw.rectangle((x, y, x + 11, y + 11), fill=tuple(palette_rgb([color])[0].tolist()), outline=(40, 40, 40))
        draw.text((x + 16, y), text, fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def blend_groups(pixels: np.ndarray, groups: np.ndarray, colors: Sequence[str], alpha: float) -> np.ndarray:
    """One tile with each patch coloured by its group (-1: no group, left as is)."""
    img = np.asarray(pixels, dtype=np.float32)
    s = img.shape[0]
    h, w = groups.shape
    rows = np.minimum((np.arange(s) * h) // s, h - 1)
    cols = np.minimum((np.arange(s) * w) // s, w - 1)
    g = np.asarray(groups)[np.ix_(rows, cols)]
    valid = np.isfinite(g) & (g >= 0)
    idx = np.where(valid, g, 0).astype(np.int64) % len(colors)
    rgb = palette_rgb(colors)[idx].astype(np.float32)
    a = alpha * valid[..., None]
    return (img * (1 - a) + rgb * a).round().astype(np.uint8)
