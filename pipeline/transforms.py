"""Geometric sweeps (paper §"geometric transformations"): rotated and rescaled copies.

Copies are made from the base image's model input (S×S pixels) so that every copy is a pure
geometric transform of exactly what the model saw; ``stores.transforms`` maps coordinates
with the same conventions.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def parse_sweep(spec: str | None, identity: float) -> list[float]:
    """'start:stop:step' -> values in [start, stop), without the identity value (that copy
    is the base image itself): '0:360:15' -> 15, 30, …, 345; '0.5:1.0:0.1' -> 0.5, …, 0.9."""
    if not spec:
        return []
    parts = [float(p) for p in str(spec).split(":")]
    if len(parts) != 3 or parts[2] <= 0:
        raise ValueError(f"sweep {spec!r} must be start:stop:step with step > 0")
    start, stop, step = parts
    n = max(0, int(np.ceil((stop - start) / step - 1e-9)))
    values = [round(start + i * step, 6) for i in range(n)]
    return [v for v in values if abs(v - identity) > 1e-9]


def apply_transform(pixels: np.ndarray, kind: str, param: float) -> np.ndarray:
    """uint8 (S, S, 3) -> the transformed uint8 (S, S, 3) copy."""
    if kind == "none":
        return pixels
    img = Image.fromarray(pixels)
    size = pixels.shape[0]
    if kind == "rotate":
        # counter-clockwise about the centre, zero fill: the border artefacts the paper reports
        return np.asarray(img.rotate(param, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)))
    if kind == "scale":
        if not 0 < param <= 1:
            raise ValueError(f"scale factor must be in (0, 1], got {param}")
        side = size * param
        lo = (size - side) / 2
        box = (lo, lo, lo + side, lo + side)
        return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))
    raise ValueError(f"unknown transform {kind!r}")


def transform_list(rotate: str | None, scale: str | None) -> list[tuple[str, float]]:
    return [("rotate", a) for a in parse_sweep(rotate, 0.0)] + [("scale", s) for s in parse_sweep(scale, 1.0)]
