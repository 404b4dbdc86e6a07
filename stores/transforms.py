"""Where a patch of a base image lands in its rotated or rescaled copy: pure coordinate maps.

Conventions (shared with ``pipeline.transforms``, which makes the copies):

* ``rotate`` by θ degrees turns the S×S image counter-clockwise about its centre (PIL's
  ``Image.rotate``), filling the uncovered corners with zeros. A base pixel ``p`` lands at
  ``c + R(θ)(p − c)`` with y pointing down.
* ``scale`` by s ∈ (0, 1] crops the centred box of side s·S and resizes it back to S, i.e.
  zooms in by 1/s. A base pixel lands at ``c + (p − c)/s``.

A patch is mapped through its cell centre; when that point leaves the canvas the patch has no
counterpart ("outside", returned as ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TRANSFORM_KINDS = ("none", "rotate", "scale")


def transform_point(px: float, py: float, size: float, kind: str, param: float) -> tuple[float, float]:
    """Pixel coordinates of base point (px, py) in the transformed S×S image."""
    c = size / 2.0
    if kind == "none":
        return px, py
    if kind == "rotate":
        t = math.radians(param)
        dx, dy = px - c, py - c
        return c + dx * math.cos(t) + dy * math.sin(t), c - dx * math.sin(t) + dy * math.cos(t)
    if kind == "scale":
        if not param > 0:
            raise ValueError(f"scale factor must be > 0, got {param}")
        return c + (px - c) / param, c + (py - c) / param
    raise ValueError(f"unknown transform {kind!r}; known: {TRANSFORM_KINDS}")


def map_patch(y: int, x: int, height: int, width: int, kind: str, param: float) -> tuple[int, int] | None:
    """Patch (y, x) of an H×W map of the base image -> the patch of the copy, or None if outside."""
    # work in a unit-free canvas of side 1 (the maps cover the whole square image)
    px, py = (x + 0.5) / width, (y + 0.5) / height
    tx, ty = transform_point(px, py, 1.0, kind, param)
    if not (0.0 <= tx < 1.0 and 0.0 <= ty < 1.0):
        return None
    return min(height - 1, int(ty * height)), min(width - 1, int(tx * width))


def sweep_similarity(base_vectors: np.ndarray, copies: Sequence[np.ndarray], kinds: Sequence[str],
                     params: Sequence[float], y: int, x: int) -> np.ndarray:
    """Cosine between base patch (y, x) and its counterpart in each copy (NaN where outside).

    ``base_vectors`` and each copy are unit vectors (H, W, D) of one layer.
    """
    h, w = base_vectors.shape[:2]
    q = np.asarray(base_vectors[y, x], dtype=np.float32)
    out = np.full(len(copies), np.nan, dtype=np.float32)
    for i, (vecs, kind, param) in enumerate(zip(copies, kinds, params, strict=True)):
        hit = map_patch(y, x, h, w, kind, float(param))
        if hit is not None:
            out[i] = float(np.asarray(vecs[hit], dtype=np.float32) @ q)
    return out


def copies_of(base_ids: np.ndarray, base: int) -> np.ndarray:
    """Image ids whose ``base_id`` is ``base`` (the transformed copies of one image)."""
    return np.flatnonzero(np.asarray(base_ids) == base)
