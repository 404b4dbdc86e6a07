"""PNG export of the current grid, composed on the server with the figures' own colours.

Bokeh's ``export_png`` needs Selenium and a webdriver; composing the picture from the arrays
the figures show (same palette, colour range and opacity, nearest-neighbour upsampling like the
``Image`` glyph) needs only Pillow and gives the same picture at the images' full resolution.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

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


def compose_grid_png(pixels: np.ndarray, maps: Mapping[str, np.ndarray | None],
                     clims: Mapping[str, tuple[float, float]], palette: Sequence[str], alpha: float,
                     ncols: int, captions: Sequence[str] | None = None, gap: int = 6) -> bytes:
    """PNG of the page: one grid per layer (``ncols`` tiles wide), layers side by side."""
    n = len(pixels)
    s = int(pixels.shape[1]) if n else 1
    ncols = max(1, min(ncols, n or 1))
    nrows = max(1, -(-n // ncols))
    band = 14 if captions else 0
    grid_w = ncols * (s + gap) - gap
    grid_h = nrows * (s + gap + band) - gap
    layers = list(maps)
    title = 16
    width = max(1, len(layers) * (grid_w + 3 * gap) - 3 * gap)
    canvas = PILImage.new("RGB", (width, grid_h + title), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for li, layer in enumerate(layers):
        ox = li * (grid_w + 3 * gap)
        draw.text((ox, 2), layer, fill=(0, 0, 0))
        layer_maps = maps[layer]
        for i in range(n):
            r, c = divmod(i, ncols)
            x, y = ox + c * (s + gap), title + r * (s + gap + band)
            if captions:
                draw.text((x, y), captions[i], fill=(40, 40, 40))
            sim = None if layer_maps is None else layer_maps[i]
            canvas.paste(PILImage.fromarray(blend_tile(pixels[i], sim, clims[layer], palette, alpha)),
                         (x, y + band))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
