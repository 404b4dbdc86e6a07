"""Per-tile maps cut out of a layer figure's overlay mosaic (shared by the in-process and browser tests).

A figure's overlay is one image over all its tiles; where each tile's map lies is read from where
the figure draws the image tiles (the ``x:<layer>``/``y:<layer>`` columns of its RGB source), not
from the app's own layout code, so a test checks the layout too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def cut_tiles(mosaic: np.ndarray, dw: float, dh: float, xs: Sequence[float], ys: Sequence[float],
              image_size: int) -> np.ndarray:
    """``(n, H, W)`` maps of the tiles at data positions (xs, ys) of an overlay of size dw × dh."""
    m = np.asarray(mosaic)[::-1]  # Bokeh row 0 is the bottom
    rows, cols = m.shape
    cell_w, cell_h = dw / cols, dh / rows
    h, w = round(image_size / cell_h), round(image_size / cell_w)
    out = []
    for x0, y0 in zip(xs, ys, strict=True):
        c0, r0 = round(x0 / cell_w), round((dh - y0 - image_size) / cell_h)
        out.append(m[r0:r0 + h, c0:c0 + w])
    return np.stack(out)


def tiles_from_sources(overlay: Mapping[str, Any], rgb: Mapping[str, Any], layer: str, image_size: int) -> np.ndarray:
    """:func:`cut_tiles` from the columns of an overlay source and the RGB source of its figure;
    an image may be an array or a browser's ``{"shape", "values"}`` dict (``browser_models``)."""
    img = overlay["image"][0]
    if isinstance(img, dict):
        img = np.asarray(img["values"], np.float32).reshape(img["shape"])
    return cut_tiles(img, overlay["dw"][0], overlay["dh"][0], rgb[f"x:{layer}"], rgb[f"y:{layer}"], image_size)
