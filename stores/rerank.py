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
- a rebuild of the same store (same ``created`` stamp) keeps the vouched rows and appends;
- a new file (another store, or no vouched rows) is written aside and renamed over the old
  one, so mapped pages of readers that still hold the old file stay valid (POSIX keeps the old
  inode alive until they unmap it).

The file exists for local stores only; remote (fsspec) stores re-rank from Zarr.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from .index_meta import IndexMeta
from .localfiles import temp_file_in
from .reader import StoreReader
from .urls import is_local

SUFFIX = ".f16"
DTYPE = np.dtype("<f2")

Fetch = Callable[[np.ndarray], np.ndarray]


def rerank_path(store_url: str, layer: str) -> str | None:
    """Local path of the layer's re-rank file, or None for remote stores."""
    from .index import index_path

    base = index_path(store_url, layer)
    return base.removeprefix("file://") + SUFFIX if is_local(base) else None


class RerankAppender:
    """Brings the re-rank file up to the reader's committed images, fed block by block.

    The index build passes every block it reads anyway (:meth:`feed`), so the store is read
    once for both; :meth:`close` reads whatever was not fed, makes the rows durable and, for a
    new file, renames it into place. ``valid_rows`` is the count the index's ``.json`` vouches
    for (0: write a new file); rows past it — what a killed append left — are cut first.
    """

    def __init__(self, reader: StoreReader, layer: str, valid_rows: int, images_per_block: int = 256):
        path = rerank_path(reader.url, layer)
        if path is None:
            raise ValueError("re-rank files are written for local stores only")
        g = reader.geometry(layer)
        self.reader, self.layer, self.path, self.block = reader, layer, path, images_per_block
        self.hw, self.dim = g.patches_per_image, g.dim
        row_bytes = g.dim * DTYPE.itemsize
        if valid_rows % self.hw:
            raise ValueError(f"re-rank rows {valid_rows} are not whole images of {self.hw} patches")
        self.end_image = reader.n_images
        self.fresh = valid_rows == 0 or not os.path.exists(path) or os.path.getsize(path) < valid_rows * row_bytes
        self.next_image = 0 if self.fresh else valid_rows // self.hw
        self.up_to_date = (not self.fresh and self.next_image >= self.end_image
                           and os.path.getsize(path) == valid_rows * row_bytes)
        self._file: BinaryIO | None = None
        self._target = path
        if self.up_to_date:
            return  # leave the file (and its mtime) alone
        if self.fresh:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, self._target = temp_file_in(os.path.dirname(path), suffix=SUFFIX)
            self._file = os.fdopen(fd, "wb")
        else:
            self._file = open(path, "r+b")  # noqa: SIM115 - closed in close()/abort()
            self._file.truncate(valid_rows * row_bytes)  # drop what a killed append left
            self._file.seek(valid_rows * row_bytes)

    @property
    def rows(self) -> int:
        """Rows the file holds once closed: every committed image's patches."""
        return self.end_image * self.hw

    def feed(self, first_image: int, vectors: np.ndarray) -> None:
        """Rows of whole images ``first_image``… (all of them, failed images' zeros included);
        blocks before the file's end are skipped, a gap is filled from the store."""
        if self._file is None:
            return
        n_images = len(vectors) // self.hw
        last = min(first_image + n_images, self.end_image)
        if last <= self.next_image:
            return
        if first_image > self.next_image:
            self._copy_from_store(first_image)
        skip = (self.next_image - first_image) * self.hw
        rows = np.asarray(vectors).reshape(-1, self.dim)[skip:(last - first_image) * self.hw]
        self._file.write(np.ascontiguousarray(rows, dtype=DTYPE).tobytes())
        self.next_image = last

    def close(self) -> int:
        """Write the images not fed, fsync, rename a new file into place; returns the row count."""
        if self._file is None:
            return self.rows
        try:
            self._copy_from_store(self.end_image)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.fresh:
                os.replace(self._target, self.path)
        except BaseException:
            self.abort()
            raise
        self._file = None
        return self.rows

    def abort(self) -> None:
        """Give up: a new file is deleted, an appended one keeps its vouched rows (cut next time)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.fresh and os.path.exists(self._target):
            os.unlink(self._target)

    def _copy_from_store(self, until_image: int) -> None:
        assert self._file is not None
        for lo in range(self.next_image, until_image, self.block):
            hi = min(until_image, lo + self.block)
            block = self.reader.vectors(self.layer, slice(lo, hi)).reshape(-1, self.dim)
            self._file.write(np.ascontiguousarray(block, dtype=DTYPE).tobytes())
        self.next_image = max(self.next_image, until_image)


def open_rerank_rows(store_url: str, layer: str, meta: IndexMeta | None, dim: int) -> np.ndarray | None:
    """Memory-map the rows the index's metadata vouches for; None when absent or too short."""
    rows = meta.rerank_rows if meta is not None else 0
    path = rerank_path(store_url, layer)
    if rows <= 0 or path is None or not os.path.exists(path):
        return None
    if os.path.getsize(path) < rows * dim * DTYPE.itemsize:
        return None  # truncated by hand or by a disk problem: fall back to Zarr
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), rows * dim * DTYPE.itemsize, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        # a re-rank reads ~128 scattered rows: without this, each page fault reads ahead
        # 128 KB, i.e. ~16 MB of disk per query on a cold cache, evicting index pages
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=DTYPE).reshape(rows, dim)  # keeps the mapping alive


def vector_fetcher(reader: StoreReader, layer: str, meta: IndexMeta | None = None) -> Fetch:
    """``fetch(patch_ids) -> (n, D) fp16`` for exact re-rank: the re-rank file when it is
    there and covers the ids, else the Zarr store."""
    g = reader.geometry(layer)
    rows = open_rerank_rows(reader.url, layer, meta, g.dim)

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
