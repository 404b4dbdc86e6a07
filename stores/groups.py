"""NMF groups of a layer: names, the attributes contract and the read side (numpy + Zarr only).

``hoverlay factorize`` (``pipeline.factorize``) writes, per layer::

    layers/<layer>/groups          int16   (N, H, W)     argmax of the weights; -1 = no group
    layers/<layer>/group_weights   float16 (N, H, W, k)  weights against unit components

(Zarr ``dimension_names`` ``factorized_image, y, x[, group]``: see :data:`GROUPS_DIMS`.)

and sets the attributes of ``groups`` **last**. A ``groups`` array without those attributes is
being (re)written, so readers treat it as absent. The explorer reads groups through this module
and never imports the pipeline (torch, scikit-learn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FormatVersionError, StoreMismatchError
from .format import layer_path

if TYPE_CHECKING:
    import zarr

    from .reader import ImageSelection, StoreReader

GROUPS = "groups"
GROUP_WEIGHTS = "group_weights"
GROUPS_FORMAT_VERSION = 1
NO_GROUP = -1
#: Zarr ``dimension_names``. The first is not ``image``: these arrays cover the images there were
#: when the layer was factorised (row i = image i), fewer than its ``vectors`` once more are
#: appended, and xarray needs one length per dimension name in a group.
GROUPS_DIMS = ("factorized_image", "y", "x")
GROUP_WEIGHTS_DIMS = ("factorized_image", "y", "x", "group")

#: Attributes every complete ``groups`` array has; any missing means "not (fully) written".
REQUIRED_ATTRS = ("format_version", "k", "components", "method", "negative", "images",
                  "images_factorized", "reconstruction_error")


def _open(reader: StoreReader, layer: str, name: str) -> zarr.Array | None:
    """The array, re-opened on every call so a new factorisation is seen without reopening."""
    import zarr

    try:
        node = reader.group[layer_path(layer, name)]
    except (KeyError, FileNotFoundError):
        return None
    return node if isinstance(node, zarr.Array) else None


def _meta(reader: StoreReader, layer: str, arr: zarr.Array | None) -> dict[str, Any] | None:
    """Attributes of one opened ``groups`` array if they are complete, else None.

    Reading them from the same opened array as the data means the metadata and the array
    belong to the same write.
    """
    g = reader.geometry(layer)
    if arr is None:
        return None
    meta: dict[str, Any] = dict(arr.attrs)
    if any(key not in meta for key in REQUIRED_ATTRS):
        return None
    version = meta["format_version"]
    if not isinstance(version, int) or not 1 <= version <= GROUPS_FORMAT_VERSION:
        raise FormatVersionError(f"groups of layer {layer!r} in {reader.url!r} have format_version "
                                 f"{version!r}; this hoverlay reads 1..{GROUPS_FORMAT_VERSION}")
    if tuple(arr.shape[1:]) != (g.height, g.width):
        raise StoreMismatchError(f"groups of layer {layer!r} have shape {arr.shape}, the layer is "
                                 f"{g.height}x{g.width}")
    meta["components"] = np.asarray(meta["components"], dtype=np.float32).reshape(int(meta["k"]), -1)
    meta["images_covered"] = int(arr.shape[0])
    return meta


def read_group_meta(reader: StoreReader, layer: str) -> dict[str, Any] | None:
    """Attributes of a complete ``groups`` array, ``components`` as float32 (k, D); else None.

    ``images_covered`` (added here) is the array's length: images appended to the store after
    factorising are not covered.
    """
    return _meta(reader, layer, _open(reader, layer, GROUPS))


def _read_rows(arr: zarr.Array, ids: np.ndarray, fill: Any) -> np.ndarray:
    """Rows ``ids`` of an array; ids past its end (images appended after factorising) get ``fill``."""
    out = np.full((len(ids), *arr.shape[1:]), fill, dtype=arr.dtype)
    inside = ids < arr.shape[0]
    if np.any(inside):
        out[inside] = arr.get_orthogonal_selection((ids[inside],))
    return out


def read_groups(reader: StoreReader, layer: str,
                images: ImageSelection) -> tuple[np.ndarray, dict[str, Any]] | None:
    """int16 groups (…, H, W) of the selected images and the metadata, or None if not factorised.

    Like :meth:`StoreReader.norms`: one id gives (H, W), a list/array/slice gives (n, H, W).
    Images that were not factorised (failed, filtered out, or appended later) are all -1.
    """
    arr = _open(reader, layer, GROUPS)
    meta = _meta(reader, layer, arr)
    if meta is None or arr is None:
        return None
    ids, scalar = reader.image_ids(images)
    groups = _read_rows(arr, ids, NO_GROUP)
    return (groups[0] if scalar else groups), meta


def read_group_weights(reader: StoreReader, layer: str, images: ImageSelection) -> np.ndarray | None:
    """float16 weights (…, H, W, k) of the selected images (zeros where not factorised), or None."""
    if read_group_meta(reader, layer) is None:
        return None
    arr = _open(reader, layer, GROUP_WEIGHTS)
    if arr is None:
        return None
    ids, scalar = reader.image_ids(images)
    weights = _read_rows(arr, ids, 0)
    return weights[0] if scalar else weights


# ================================================================================ write side
class GroupsWriter:
    """Writes one layer's NMF groups (``hoverlay factorize`` computes them; this stores them).

    Both arrays are (re)created empty first — ``groups`` before ``group_weights``, without the
    attributes, so readers see "absent" from then on — then filled range by range, and
    :meth:`finish` sets the attributes last, which is what makes the result visible. The caller
    holds the store's lock (:class:`~hoverlay.stores.lock.StoreLock`).
    """

    def __init__(self, writer_group: zarr.Group, layer: str, n_images: int, height: int, width: int,
                 k: int, chunk: int):
        import zarr.codecs

        codec = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        self.layer, self.k = layer, int(k)
        self.groups = writer_group.create_array(
            layer_path(layer, GROUPS), shape=(n_images, height, width), dtype="int16",
            chunks=(chunk, height, width), compressors=codec, fill_value=NO_GROUP, overwrite=True,
            dimension_names=GROUPS_DIMS)
        self.weights = writer_group.create_array(
            layer_path(layer, GROUP_WEIGHTS), shape=(n_images, height, width, k), dtype="float16",
            chunks=(1, height, width, k), shards=(chunk, height, width, k), compressors=codec,
            fill_value=0, overwrite=True, dimension_names=GROUP_WEIGHTS_DIMS)

    def write(self, lo: int, groups: np.ndarray, weights: np.ndarray) -> None:
        """Rows ``lo .. lo+len(groups)``: int16 groups (n, H, W), float16 weights (n, H, W, k).

        Write whole shards (multiples of the store's chunk) so no object is rewritten."""
        hi = lo + len(groups)
        self.weights[lo:hi] = np.asarray(weights, dtype=np.float16)
        self.groups[lo:hi] = np.asarray(groups, dtype=np.int16)

    def finish(self, meta: dict[str, Any]) -> None:
        """Publish: the attributes (``components`` as k rows) are the last write."""
        meta = {"format_version": GROUPS_FORMAT_VERSION, **meta}
        missing = [key for key in REQUIRED_ATTRS if key not in meta]
        if missing:
            raise ValueError(f"groups metadata lacks {missing}")
        if int(meta["k"]) != self.k or len(meta["components"]) != self.k:
            raise ValueError(f"groups metadata has k={meta['k']} and {len(meta['components'])} "
                             f"components; the arrays were made for k={self.k}")
        self.groups.attrs.update(meta)
