"""Pure numeric kernels of the explorer: similarity maps, colour ranges, patch geometry.

Plain numpy on arrays the store hands out; no Panel, Bokeh or Zarr here, so every number the
app draws can be checked against a float64 reference in a unit test, and the hover path's
server work is exactly what :func:`page_similarity` costs.

Conventions
-----------
- A layer's activation map has ``H x W`` cells over a square ``S x S`` image (the model input).
  Cell ``(y, x)`` covers image pixels ``[x*S/W, (x+1)*S/W) x [y*S/H, (y+1)*S/H)``; image pixel
  coordinates have ``y`` growing downwards, as in the stored pixel arrays.
- Stored vectors are unit length (float16) with their original norms kept beside them (float32):
  cosine is an inner product, and dot product / euclidean distance are recovered from the norms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: Similarity functions the explorer offers; the first is the default.
SIMILARITY_FUNCTIONS: tuple[str, ...] = ("cosine", "dot", "rbf")


@dataclass(frozen=True)
class PageBlock:
    """One layer's patches of a page of images, laid out once for repeated matmuls.

    Built when the page changes, then reused for every hover: the float16 -> float32
    conversion and the reshape to a C-contiguous ``(n*H*W, D)`` matrix are paid once per page,
    not once per pointer move.
    """

    vectors: np.ndarray  # float32 (n*H*W, D), C-contiguous unit vectors
    norms: np.ndarray  # float32 (n*H*W,), original activation norms
    shape: tuple[int, int, int]  # (n, H, W)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class QueryVector:
    """The hovered patch's vector in one layer: unit direction and original norm."""

    unit: np.ndarray  # float32 (D,)
    norm: float


def page_block(vectors: np.ndarray, norms: np.ndarray | None = None) -> PageBlock:
    """Lay out float16 unit vectors ``(n, H, W, D)`` (and norms ``(n, H, W)``) for matmuls."""
    v = np.asarray(vectors)
    if v.ndim != 4:
        raise ValueError(f"page vectors must be (n, H, W, D), got shape {v.shape}")
    n, h, w, d = v.shape
    flat = np.ascontiguousarray(v.reshape(n * h * w, d), dtype=np.float32)
    if norms is None:
        nrm = np.ones(n * h * w, dtype=np.float32)
    else:
        nrm = np.ascontiguousarray(np.asarray(norms, dtype=np.float32).reshape(n * h * w))
    return PageBlock(flat, nrm, (n, h, w))


def similarity_map(query: QueryVector, block: PageBlock, function: str = "cosine",
                   sigma: float = 1.0) -> np.ndarray:
    """Similarity of one query patch to every patch of a page: float32 ``(n, H, W)``.

    One float32 matrix-vector product over the whole page; the non-cosine functions only
    rescale its result with the stored norms, so they cost the same:

    - ``cosine``: ``q̂·v̂`` (vectors are stored unit length);
    - ``dot``: ``(q̂·v̂)·|q|·|v|``, the inner product of the original activations;
    - ``rbf``: ``exp(-‖a-b‖² / (2σ²))`` on the original activations, with
      ``‖a-b‖² = |a|² + |b|² - 2|a||b|(â·b̂)``.
    """
    if query.unit.shape != (block.dim,):
        raise ValueError(f"query has dimension {query.unit.shape}, page patches have {block.dim}")
    # The one product of the hover path. Not ``@``: BLAS hands a (12544 x 40) product to its thread
    # pool, whose wake-up after idle time cost ~3 ms on a 2-core machine (measured), ten times the
    # product itself; einsum's single-threaded SIMD loop takes ~0.3 ms and touches no global state.
    cos = np.einsum("pd,d->p", block.vectors, query.unit)
    if function == "cosine":
        out = cos
    elif function == "dot":
        out = cos * (block.norms * np.float32(query.norm))
    elif function == "rbf":
        qn = np.float32(query.norm)
        d2 = block.norms * block.norms + qn * qn - 2 * qn * block.norms * cos
        np.maximum(d2, 0, out=d2)  # rounding can make tiny distances negative
        out = np.exp(d2 * np.float32(-0.5 / (sigma * sigma)))
    else:
        raise ValueError(f"unknown similarity function {function!r}; choose from {SIMILARITY_FUNCTIONS}")
    return out.astype(np.float32, copy=False).reshape(block.shape)


def page_similarity(queries: Mapping[str, QueryVector], blocks: Mapping[str, PageBlock],
                    function: str = "cosine",
                    sigmas: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Similarity maps of a page for several layers at once: ``{layer: (n, H, W) float32}``.

    Each layer is one matmul over all images of the page. Layers are not fused into a single
    block-diagonal product on purpose: their dimensions differ (e.g. 40, 112, 320), so fusing
    would multiply the work by the number of layers for no saving in calls that matter.
    """
    sigmas = sigmas or {}
    return {layer: similarity_map(queries[layer], block, function, sigmas.get(layer, 1.0))
            for layer, block in blocks.items()}


def color_range(function: str, *, nonnegative: bool = True, norm_hi: float = 1.0) -> tuple[float, float]:
    """The fixed colour range of a similarity function, so the colour mapper never changes.

    Cosine of non-negative (post-ReLU) vectors lies in [0, 1], otherwise in [-1, 1]; the RBF
    kernel lies in [0, 1]; a dot product is bounded by the squared norm of the layer's largest
    activations (``norm_hi``, e.g. the 99th percentile of the stored norms).
    """
    if function == "cosine":
        return (0.0, 1.0) if nonnegative else (-1.0, 1.0)
    if function == "rbf":
        return (0.0, 1.0)
    if function == "dot":
        hi = float(norm_hi) ** 2 if norm_hi > 0 else 1.0
        return (0.0, hi) if nonnegative else (-hi, hi)
    raise ValueError(f"unknown similarity function {function!r}; choose from {SIMILARITY_FUNCTIONS}")


# ------------------------------------------------------------------------------ geometry
def cell_center(y: int | np.ndarray, x: int | np.ndarray, hw: tuple[int, int],
                image_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Image-pixel coordinates (cy, cx) of the centre of cell (y, x) of an ``H x W`` map."""
    h, w = hw
    return ((np.asarray(y) + 0.5) * image_size / h, (np.asarray(x) + 0.5) * image_size / w)


def point_to_cell(py: float | np.ndarray, px: float | np.ndarray, hw: tuple[int, int],
                  image_size: float) -> tuple[np.ndarray, np.ndarray]:
    """The cell of an ``H x W`` map containing image point (py, px); the far edge belongs to the last cell."""
    h, w = hw
    cy = np.clip(np.floor(np.asarray(py) * h / image_size), 0, h - 1).astype(np.int64)
    cx = np.clip(np.floor(np.asarray(px) * w / image_size), 0, w - 1).astype(np.int64)
    return cy, cx


def map_patch(y: int | np.ndarray, x: int | np.ndarray, src_hw: tuple[int, int],
              dst_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Map cell (y, x) of one layer to the cell of another layer covering the same place.

    The receptive field of a cell is centred on the cell's centre in image coordinates,
    ``(y+0.5)*S/H``; the corresponding cell of a layer with ``H'`` rows is the one containing that
    point, ``floor(((y+0.5)*S/H) * H'/S)``. ``S`` cancels, and computing ``floor((y+0.5)*H'/H)``
    without it keeps the result bit-identical to the browser's copy of this rule (the client-side
    outline of the mapped patch). Identity when the resolutions agree.
    """
    (sh, sw), (dh, dw) = src_hw, dst_hw
    y2 = np.floor((np.asarray(y, dtype=np.float64) + 0.5) * dh / sh).astype(np.int64)
    x2 = np.floor((np.asarray(x, dtype=np.float64) + 0.5) * dw / sw).astype(np.int64)
    return np.clip(y2, 0, dh - 1), np.clip(x2, 0, dw - 1)


def pointer_to_patch(px: float, py: float, hw: tuple[int, int],
                     image_size: float) -> tuple[int, int] | None:
    """Patch (y, x) under a pointer at image pixel (px, py), or None outside the image.

    The image spans ``[0, S]`` inclusive on both axes: a pointer exactly on the right or bottom
    edge is still over the image and snaps to the last cell.
    """
    if not (0 <= px <= image_size and 0 <= py <= image_size):
        return None
    cy, cx = point_to_cell(py, px, hw, image_size)
    return int(cy), int(cx)


def cell_bounds(y: int, x: int, hw: tuple[int, int], image_size: float) -> tuple[float, float, float, float]:
    """Image-pixel box (x0, y0, x1, y1) of cell (y, x): what an outline of the patch draws."""
    h, w = hw
    return (x * image_size / w, y * image_size / h, (x + 1) * image_size / w, (y + 1) * image_size / h)


def crop_box(y: int, x: int, hw: tuple[int, int], image_size: int,
             context: float = 1.0, min_size: int = 32) -> tuple[int, int, int, int]:
    """Integer pixel box (x0, y0, x1, y1) around cell (y, x) with ``context`` cells of margin.

    The box keeps a minimum size (tiny cells of fine layers are unreadable alone) and is
    shifted, not shrunk, at the image border so every crop has the same size for one layer.
    """
    h, w = hw
    cy, cx = cell_center(y, x, hw, image_size)
    size = max(min_size, int(round(max(image_size / h, image_size / w) * (1 + 2 * context))))
    size = min(size, image_size)
    x0 = int(np.clip(round(float(cx) - size / 2), 0, image_size - size))
    y0 = int(np.clip(round(float(cy) - size / 2), 0, image_size - size))
    return x0, y0, x0 + size, y0 + size


def images_by_best_patch(ids: np.ndarray, patches_per_image: int) -> np.ndarray:
    """Image ids in order of their best patch in a ranked list of global patch ids (first wins)."""
    images = np.asarray(ids, dtype=np.int64) // patches_per_image
    _, first = np.unique(images, return_index=True)
    return images[np.sort(first)]
