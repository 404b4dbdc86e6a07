"""The re-rank file: a layer's fp16 vectors as one flat array, row = global patch id.

Compressed indexes (SQ8, SQ4, PQ) only propose candidates; their k results must be re-scored
from the stored vectors. Reading them from Zarr costs one chunk (a whole image's H·W·D vectors,
decompressed) per candidate image, ~2-3 ms each, so a top-32 re-ranking 128 candidates spent
most of a second there. ``index/<layer>.f16`` holds the same fp16 values uncompressed, so a
candidate is one memory-mapped 2·D-byte row (page cache, microseconds).

Layout: raw little-endian float16, shape (rows, D), C order, rows = images × H·W (failed
images are zero rows). The valid row count is recorded in the index's ``.json`` under
``rerank`` and only ever grows by appending, so:

- a reader maps exactly the rows its ``.json`` names, written and fsynced before that ``.json``;
- bytes past that count (a run killed while appending) are cut before the next append;
- a rebuild writes a new file and renames it over the old one, so mapped pages of readers that
  still hold the old file stay valid (POSIX keeps the old inode alive until they unmap it).

The file exists for local stores only; remote (fsspec) stores re-rank from Zarr.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from ._zarr import is_local
from .reader import StoreReader

SUFFIX = ".f16"
DTYPE = np.dtype("<f2")

Fetch = Callable[[np.ndarray], np.ndarray]


def rerank_path(store_url: str, layer: str) -> str | None:
    """Local path of the layer's re-rank file, or None for remote stores."""
    from .index import index_path

    base = index_path(store_url, layer)
    return base.removeprefix("file://") + SUFFIX if is_local(base) else None


def write_rerank_rows(reader: StoreReader, layer: str, valid_rows: int, images_per_block: int = 256) -> int:
    """Bring the re-rank file up to the reader's committed images; returns its row count.

    ``valid_rows`` is the count the index's ``.json`` vouches for (0: write a new file).
    Only images past those rows are read from the store.
    """
    path = rerank_path(reader.url, layer)
    if path is None:
        raise ValueError("re-rank files are written for local stores only")
    g = reader.geometry(layer)
    hw, row_bytes = g.patches_per_image, g.dim * DTYPE.itemsize
    if valid_rows % hw:
        raise ValueError(f"re-rank rows {valid_rows} are not whole images of {hw} patches")
    first_image = valid_rows // hw
    f: BinaryIO
    fresh = valid_rows == 0 or not os.path.exists(path) or os.path.getsize(path) < valid_rows * row_bytes
    if not fresh and first_image >= reader.n_images and os.path.getsize(path) == valid_rows * row_bytes:
        return valid_rows  # up to date: leave the file (and its mtime) alone
    if fresh:
        first_image = 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, target = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=os.path.dirname(path))
        f = os.fdopen(fd, "wb")
    else:
        target = path
        f = open(path, "r+b")  # noqa: SIM115 - closed below, after fsync
        f.truncate(valid_rows * row_bytes)  # drop what a killed append left past the vouched rows
        f.seek(valid_rows * row_bytes)
    try:
        with f:
            for lo in range(first_image, reader.n_images, images_per_block):
                hi = min(reader.n_images, lo + images_per_block)
                block = reader.vectors(layer, slice(lo, hi)).reshape(-1, g.dim)
                f.write(np.ascontiguousarray(block, dtype=DTYPE).tobytes())
            f.flush()
            os.fsync(f.fileno())
        if fresh:
            os.replace(target, path)
    except BaseException:
        if fresh and os.path.exists(target):
            os.unlink(target)
        raise
    return reader.n_images * hw


def open_rerank_rows(store_url: str, layer: str, meta: dict[str, Any], dim: int) -> np.memmap | None:
    """Memory-map the rows the index's metadata vouches for; None when absent or too short."""
    rows = int((meta.get("rerank") or {}).get("rows", 0))
    path = rerank_path(store_url, layer)
    if rows <= 0 or path is None or not os.path.exists(path):
        return None
    if os.path.getsize(path) < rows * dim * DTYPE.itemsize:
        return None  # truncated by hand or by a disk problem: fall back to Zarr
    return np.memmap(path, dtype=DTYPE, mode="r", shape=(rows, dim))


def vector_fetcher(reader: StoreReader, layer: str, meta: dict[str, Any] | None = None) -> Fetch:
    """``fetch(patch_ids) -> (n, D) fp16`` for exact re-rank: the re-rank file when it is
    there and covers the ids, else the Zarr store."""
    g = reader.geometry(layer)
    rows = open_rerank_rows(reader.url, layer, meta or {}, g.dim)

    def from_store(ids: np.ndarray) -> np.ndarray:
        return reader.patch_vectors(layer, ids)

    if rows is None:
        return from_store

    def from_file(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and int(ids.max()) >= rows.shape[0]:
            return from_store(ids)
        return np.asarray(rows[ids])

    return from_file
