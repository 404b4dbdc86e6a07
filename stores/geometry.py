"""Patch ids and coordinates: pure functions on integers and arrays.

A *patch* is one spatial cell (y, x) of one layer's activation map for one image i.
Its global id is ``i*H*W + y*W + x``; FAISS indexes use these ids so that a search hit
maps straight back to an image and a location without a lookup table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OutOfRangeError


@dataclass(frozen=True)
class LayerGeometry:
    """Shape of one layer's activation map: ``height`` x ``width`` cells of ``dim`` channels."""

    height: int
    width: int
    dim: int

    @property
    def patches_per_image(self) -> int:
        return self.height * self.width

    def as_dict(self) -> dict[str, int]:
        return {"height": self.height, "width": self.width, "dim": self.dim}


def patch_id(image: int | np.ndarray, y: int | np.ndarray, x: int | np.ndarray,
             geometry: LayerGeometry, n_images: int | None = None) -> np.ndarray | int:
    """Global patch id of (image, y, x); raises :class:`OutOfRangeError` naming the bad value."""
    image_a, y_a, x_a = (_as_int64(name, v) for name, v in (("image", image), ("y", y), ("x", x)))
    _check_range("y", y_a, geometry.height)
    _check_range("x", x_a, geometry.width)
    if n_images is not None:
        _check_range("image", image_a, n_images)
    elif np.any(image_a < 0):
        raise OutOfRangeError(f"image id {int(image_a.min())} is negative")
    ids = image_a * geometry.patches_per_image + y_a * geometry.width + x_a
    return int(ids) if ids.ndim == 0 else ids


def patch_coords(ids: int | np.ndarray, geometry: LayerGeometry,
                 n_images: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`patch_id`: (image, y, x) arrays for global patch ids."""
    ids_a = np.asarray(ids, dtype=np.int64)
    limit = None if n_images is None else n_images * geometry.patches_per_image
    if np.any(ids_a < 0) or (limit is not None and np.any(ids_a >= limit)):
        bad = ids_a[(ids_a < 0) | ((ids_a >= limit) if limit is not None else False)]
        raise OutOfRangeError(
            f"patch id {int(bad.flat[0])} is outside [0, {limit if limit is not None else 'inf'})")
    image, rest = np.divmod(ids_a, geometry.patches_per_image)
    y, x = np.divmod(rest, geometry.width)
    return image, y, x


def _as_int64(name: str, values: int | np.ndarray) -> np.ndarray:
    """int64 array, or :class:`OutOfRangeError` for values beyond int64 (e.g. from a URL)."""
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError:
        raise OutOfRangeError(f"{name} {values} is out of range") from None


def _check_range(name: str, values: np.ndarray, upper: int) -> None:
    bad = (values < 0) | (values >= upper)
    if np.any(bad):
        raise OutOfRangeError(f"{name} {int(values[bad].flat[0])} is outside [0, {upper})")
