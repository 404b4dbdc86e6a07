"""The paper's case-study observations as numbers: pure numpy kernels on similarity maps.

The notebooks (``notebooks/_make.py``) turn each observation of *Interactive Similarity
Overlays* into a measurement with these functions and a stated rule; nothing here knows about
models or stores, so each kernel is tested on synthetic maps (tests/test_case_metrics.py).

Maps are 2-D arrays ``(H, W)`` (or stacks ``(..., H, W)``) of cosine similarities. Layers of
different resolutions are compared at the same distance *in the image*: a lag of ``H // h``
cells on an ``H``-cell map is one cell of an ``h``-cell map (:func:`image_lag`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .transforms import map_patch


# -------------------------------------------------------------------------------- smoothness
def _pairs(m: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of cells ``lag`` apart along a row or a column, as two flat arrays per map
    (shape ``(..., n_pairs)``)."""
    if lag < 1:
        raise ValueError(f"lag must be >= 1, got {lag}")
    h, w = m.shape[-2:]
    if lag >= h and lag >= w:
        raise ValueError(f"lag {lag} leaves no pairs on a {h}x{w} map")
    lead = m.shape[:-2]
    a = [m[..., :, :-lag].reshape(*lead, -1), m[..., :-lag, :].reshape(*lead, -1)]
    b = [m[..., :, lag:].reshape(*lead, -1), m[..., lag:, :].reshape(*lead, -1)]
    return np.concatenate(a, axis=-1), np.concatenate(b, axis=-1)


def autocorrelation(maps: np.ndarray, lag: int = 1) -> np.ndarray:
    """Spatial autocorrelation of each map at ``lag`` cells: the Pearson correlation between
    every cell and the cell ``lag`` to its right or below (both directions pooled).

    1 for a map that changes slowly (a smooth ramp), about 0 for white noise, −1 for a
    checkerboard at lag 1; NaN for a constant map. Higher means smoother.
    """
    m = np.asarray(maps, dtype=np.float64)
    a, b = _pairs(m, lag)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def total_variation(maps: np.ndarray, lag: int = 1) -> np.ndarray:
    """Mean absolute difference between cells ``lag`` apart (rows and columns pooled), divided
    by the map's standard deviation: scale-free, so maps of different contrast compare.

    Near 0 for a smooth map (a ramp across W cells: about 1.7 / W), about 2/√π ≈ 1.13 for
    white noise, 2 for a ±1 checkerboard at lag 1; NaN for a constant map. Lower means
    smoother.
    """
    m = np.asarray(maps, dtype=np.float64)
    a, b = _pairs(m, lag)
    tv = np.abs(a - b).mean(axis=-1)
    sd = m.reshape(*m.shape[:-2], -1).std(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > 0, tv / np.where(sd > 0, sd, 1.0), np.nan)


def image_lag(height: int, coarsest: int) -> int:
    """Cells of an ``height``-cell map that span one cell of a ``coarsest``-cell map of the same
    image (28 -> 4, 14 -> 2, 7 -> 1 for a coarsest grid of 7)."""
    if coarsest < 1 or height < coarsest:
        raise ValueError(f"a {height}-cell map has no lag for a coarser {coarsest}-cell map")
    return max(1, height // coarsest)


# ---------------------------------------------------------------------------- map difference
def map_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation between two maps of the same shape (NaN if either is constant)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps of different shapes {np.shape(a)} and {np.shape(b)}")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else math.nan


def map_difference(a: np.ndarray, b: np.ndarray) -> float:
    """How differently two maps rank the same cells: 1 − Pearson r, in [0, 2]; 0 for maps that
    are equal up to contrast and offset, 1 for unrelated maps, 2 for inverted ones."""
    return 1.0 - map_correlation(a, b)


def percentile_of(m: np.ndarray, value: float) -> float:
    """Percent of the map's cells strictly below ``value`` (100: nothing in the map beats it)."""
    flat = np.asarray(m, dtype=np.float64).ravel()
    return float(100.0 * np.count_nonzero(flat < value) / flat.size)


# ------------------------------------------------------------------------------- cells
def cell_at(v: float, u: float, height: int, width: int) -> tuple[int, int]:
    """The cell of an H×W map under the image point at fraction (v down, u across) of its side."""
    if not (0.0 <= v <= 1.0 and 0.0 <= u <= 1.0):
        raise ValueError(f"({v}, {u}) is not inside the image (fractions in [0, 1])")
    return min(height - 1, int(v * height)), min(width - 1, int(u * width))


def on_canvas_always(height: int, width: int, kinds: Sequence[str], params: Sequence[float]) -> np.ndarray:
    """Bool (H, W): True where a cell has a counterpart in every copy of a sweep (its centre
    stays on the canvas for every angle or scale, so :func:`stores.transforms.sweep_similarity`
    is never NaN there)."""
    if len(kinds) != len(params):
        raise ValueError("kinds and params differ in length")
    keep = np.ones((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            keep[y, x] = all(map_patch(y, x, height, width, k, float(p)) is not None
                             for k, p in zip(kinds, params, strict=True))
    return keep


def border_cells(height: int, width: int, kinds: Sequence[str], params: Sequence[float],
                 ring: int = 1) -> list[tuple[int, int]]:
    """Cells within ``ring`` cells of an edge of the base image whose counterpart stays on the
    canvas for every copy of the sweep: the border patches whose similarity can be followed at
    every angle (a rotation sweep keeps the middle of each side, not the corners)."""
    if ring < 1:
        raise ValueError(f"ring must be >= 1, got {ring}")
    keep = on_canvas_always(height, width, kinds, params)
    return [(y, x) for y in range(height) for x in range(width)
            if keep[y, x] and min(y, x, height - 1 - y, width - 1 - x) < ring]


def interior_cells(height: int, width: int, kinds: Sequence[str], params: Sequence[float],
                   margin: int | None = None) -> list[tuple[int, int]]:
    """Cells at least ``margin`` cells (default a quarter of the side) from every edge whose
    counterpart stays on the canvas for every copy: far from the zero padding."""
    if margin is None:
        margin = max(1, min(height, width) // 4)
    keep = on_canvas_always(height, width, kinds, params)
    return [(y, x) for y in range(height) for x in range(width)
            if keep[y, x] and min(y, x, height - 1 - y, width - 1 - x) >= margin]


def cell_means(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mean colour of the pixels under each cell of an H×W map: (S, S, C) -> float (H, W, C).

    Cells split the image evenly (cell y covers rows ``y·S/H`` to ``(y+1)·S/H``), as the maps do.
    """
    px = np.asarray(pixels, dtype=np.float64)
    s_y, s_x = px.shape[:2]
    ys = np.linspace(0, s_y, height + 1).round().astype(int)
    xs = np.linspace(0, s_x, width + 1).round().astype(int)
    out = np.empty((height, width, px.shape[2]), dtype=np.float64)
    for y in range(height):
        for x in range(width):
            out[y, x] = px[ys[y]:ys[y + 1], xs[x]:xs[x + 1]].reshape(-1, px.shape[2]).mean(axis=0)
    return out


# ------------------------------------------------------------------------------------ groups
def neighbour_agreement(labels: np.ndarray) -> float:
    """Fraction of 4-neighbour cell pairs (within each map of ``(..., H, W)``) with the same
    label; pairs touching a negative label (no group) are left out. 1 for a map of one group,
    about 1/k for k groups scattered at random; NaN without any pair."""
    lab = np.asarray(labels)
    pairs = [(lab[..., :, :-1], lab[..., :, 1:]), (lab[..., :-1, :], lab[..., 1:, :])]
    same = total = 0
    for a, b in pairs:
        valid = (a >= 0) & (b >= 0)
        same += int(np.count_nonzero(valid & (a == b)))
        total += int(np.count_nonzero(valid))
    return same / total if total else math.nan


def shuffled_agreement(labels: np.ndarray, n: int = 20, seed: int = 0) -> np.ndarray:
    """:func:`neighbour_agreement` of ``n`` copies whose labels are shuffled among the cells of
    each map (same group sizes per image, no spatial structure): the chance level."""
    lab = np.asarray(labels)
    rng = np.random.default_rng(seed)
    flat = lab.reshape(-1, lab.shape[-2] * lab.shape[-1])
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        shuffled = np.stack([rng.permutation(row) for row in flat]).reshape(lab.shape)
        out[i] = neighbour_agreement(shuffled)
    return out


# --------------------------------------------------------------------------------- verdicts
def sign_test(wins: int, n: int) -> float:
    """One-sided exact sign test: the probability of at least ``wins`` successes in ``n`` fair
    coin flips (ties are left out by the caller). Small means 'more often than chance'."""
    if not 0 <= wins <= n:
        raise ValueError(f"need 0 <= wins <= n, got {wins} of {n}")
    return float(sum(math.comb(n, k) for k in range(wins, n + 1)) / 2.0 ** n) if n else 1.0


def increasing(values: Sequence[float]) -> bool:
    """Strictly increasing, and every value finite."""
    v = np.asarray(values, dtype=np.float64)
    return bool(v.size > 1 and np.isfinite(v).all() and (np.diff(v) > 0).all())


def rounded(value: object, digits: int = 3) -> object:
    """A value for reading: floats (numpy too) rounded, containers rounded inside; keys like
    ``0.6000000238418579`` become ``0.6``."""
    if isinstance(value, dict):
        return {rounded(k, digits): rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rounded(v, digits) for v in value)
    if isinstance(value, np.ndarray):
        return rounded(value.tolist(), digits)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if not math.isfinite(f) else round(f, digits) + 0.0  # -0.0 -> 0.0
    return value
