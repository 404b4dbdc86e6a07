"""Reading a store lazily: only committed images, only the chunks asked for.

A :class:`StoreReader` is cheap to keep open for the life of a server process: arrays are
opened once, nothing is loaded until asked, and :meth:`StoreReader.refresh` picks up a new
commit by re-reading one small JSON document.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ._zarr import array, open_root, read_attrs
from .errors import CorruptStoreError, OutOfRangeError, UnknownLayerError
from .format import INDEX_DIR, PIXELS, StoreAttrs, layer_path
from .geometry import LayerGeometry, patch_coords, patch_id
from .row_cache import RowCache
from .table import ImageTable, read_column, store_columns
from .urls import filesystem, is_local, normalize_url

if TYPE_CHECKING:
    import dask.array


ImageSelection = int | slice | Sequence[int] | np.ndarray
#: What identifies a store's visible state (see :meth:`StoreReader.signature`).
Signature = tuple[Any, ...]


def consecutive_runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of consecutive ids, in the given order: ``[4, 5, 6, 9, 2]`` ->
    ``[(4, 7), (9, 10), (2, 3)]``.

    Reads go through slices of these runs, not one integer-array selection: Zarr 3 decodes a
    sliced range of a shard ~8x faster (16 images' pixels: 12 ms by slice, 259 ms by array;
    8 scattered images: 18 ms as single-image slices, 103 ms as one array selection).
    """
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(a) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [a.size]])
    return [(int(a[i]), int(a[j - 1]) + 1) for i, j in zip(starts, stops, strict=True)]


def _is_shutdown(exc: RuntimeError) -> bool:
    """Zarr's reads run on an executor that the interpreter shuts down at exit; a read still
    running then fails with ``concurrent.futures``' "cannot schedule new futures after
    (interpreter) shutdown" — the process ending, not a shard that does not decode."""
    return "after shutdown" in str(exc) or "interpreter shutdown" in str(exc)


class StoreReader:
    """Read-only view of the committed part of a store."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 row_cache_bytes: int = 0):
        self.url = normalize_url(url)
        #: decoded rows of single images and small selections kept for the next read (a server's
        #: sessions re-read the same images; see :mod:`stores.row_cache`); None: every read decodes
        self.rows: RowCache | None = RowCache(row_cache_bytes) if row_cache_bytes > 0 else None
        self._storage_options = storage_options
        self.group = open_root(self.url, mode="r", storage_options=storage_options)
        self.attrs: StoreAttrs = read_attrs(self.group, self.url)
        self._arrays: dict[str, zarr.Array] = {}
        self._table: ImageTable | None = None

    # ----------------------------------------------------------------- metadata
    @property
    def n_images(self) -> int:
        """Committed images: the only ones a reader ever returns."""
        return self.attrs.committed

    @property
    def layers(self) -> list[str]:
        return list(self.attrs.layers)

    @property
    def image_size(self) -> int:
        return self.attrs.image_size

    @property
    def model(self) -> dict[str, Any]:
        return self.attrs.model

    def geometry(self, layer: str) -> LayerGeometry:
        try:
            return self.attrs.layers[layer]
        except KeyError:
            raise UnknownLayerError(f"unknown layer {layer!r}; store {self.url!r} has "
                                    f"{self.layers}") from None

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The fsspec options this store was opened with (remote stores)."""
        return self._storage_options

    def signature(self) -> Signature:
        """What identifies the store's visible state: the root ``zarr.json`` and index ``.json``
        files. A server compares it every few seconds to notice a new commit or index.

        Local stores: (inode, size, mtime) of each, no file is read. Remote stores (fsspec): the
        root document's bytes (a few kB) and the index listing's sizes / mtimes / ETags, whatever
        the filesystem reports.
        """
        if is_local(self.url):
            root = self.url
            out: list[Any] = [_stat(os.path.join(root, "zarr.json"))]
            with contextlib.suppress(FileNotFoundError, NotADirectoryError), \
                    os.scandir(os.path.join(root, INDEX_DIR)) as entries:
                out += sorted((e.name, _stat(e.path)) for e in entries if e.name.endswith(".json"))
            return tuple(out)
        fs, root = filesystem(self.url, self._storage_options)
        root = root.rstrip("/")
        out = [fs.cat_file(f"{root}/zarr.json")]
        with contextlib.suppress(FileNotFoundError):
            listing = fs.ls(f"{root}/{INDEX_DIR}", detail=True)
            out += sorted((d["name"], d.get("size"), str(d.get("mtime") or d.get("LastModified") or d.get("ETag")))
                          for d in listing if str(d["name"]).endswith(".json"))
        return tuple(out)

    def refresh(self) -> bool:
        """Re-read the root attributes; True when a new commit became visible."""
        group = open_root(self.url, mode="r", storage_options=self._storage_options)
        attrs = read_attrs(group, self.url)
        changed = attrs.committed != self.attrs.committed or attrs.updated != self.attrs.updated
        if changed:
            self.group, self.attrs = group, attrs
            self._arrays.clear()  # shapes grew; reopen lazily
            self._table = None
            if self.rows is not None:  # a retried image's row may have been rewritten
                self.rows.clear()
        return changed

    # ------------------------------------------------------------------ arrays
    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            arr = array(self.group, path)
            self._arrays[path] = arr
        return arr

    def _check_images(self, images: ImageSelection) -> ImageSelection:
        n = self.n_images
        if isinstance(images, slice):
            start, stop, step = images.indices(n)
            return slice(start, stop, step)
        arr = np.asarray(images)
        if arr.dtype.kind not in "iu":
            raise OutOfRangeError(f"image ids must be integers, got {images!r}")
        bad = (arr < 0) | (arr >= n)
        if np.any(bad):
            raise OutOfRangeError(f"image id {int(arr[bad].flat[0])} is outside the {n} committed "
                                  f"images of {self.url!r}")
        return int(arr) if arr.ndim == 0 else arr

    def image_ids(self, images: ImageSelection) -> tuple[np.ndarray, bool]:
        """Selection -> (int64 ids, whether it was a single id); out-of-range ids raise."""
        sel = self._check_images(images)
        if isinstance(sel, slice):
            return np.arange(self.n_images)[sel], False
        ids = np.asarray(sel)
        return ids.reshape(-1).astype(np.int64), ids.ndim == 0

    def _read(self, path: str, images: ImageSelection, check: bool = False) -> np.ndarray:
        """The selected rows of one array; ``check``: an ok row read as all zeros is a missing
        shard (:meth:`_check_present`). Single images and small selections go through the row
        cache when there is one; slices and large selections (bulk reads) never do."""
        sel = self._check_images(images)
        if self.rows is not None and not isinstance(sel, slice):
            cached = self._read_through_cache(path, np.asarray(sel), check)
            if cached is not None:
                return cached
        data = self._decode(path, sel)
        return self._check_present(path, sel, data) if check else data

    def _read_through_cache(self, path: str, sel: np.ndarray, check: bool) -> np.ndarray | None:
        """Rows of ``sel`` from the cache, the missing ones decoded (and checked) first; None
        for a selection too large to cache (it would only push out what sessions re-read)."""
        rows = self.rows
        assert rows is not None
        arr = self._array(path)
        row_shape = tuple(arr.shape[1:])
        if sel.size * arr.dtype.itemsize * int(np.prod(row_shape)) > rows.max_bytes // 4:
            return None
        ids = [int(i) for i in sel.reshape(-1)]
        found = {i: rows.get(path, i) for i in dict.fromkeys(ids)}
        missing = np.array([i for i, row in found.items() if row is None], dtype=np.int64)
        if missing.size:
            fresh = self._decode(path, missing)
            if check:
                self._check_present(path, missing, fresh)
            for k, i in enumerate(missing.tolist()):
                found[i] = rows.put(path, i, fresh[k])
        if sel.ndim == 0:
            return found[ids[0]]
        out = np.empty((len(ids), *row_shape), dtype=arr.dtype)
        for k, i in enumerate(ids):
            out[k] = found[i]
        return out.reshape(*sel.shape, *row_shape)

    def _decode(self, path: str, sel: ImageSelection) -> np.ndarray:
        """Read and decode the rows of a checked selection from the array."""
        arr = self._array(path)
        try:
            if isinstance(sel, np.ndarray) and sel.ndim > 0:
                if sel.size == 0:
                    return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
                flat = sel.reshape(-1)
                parts = [np.asarray(arr[start:stop]) for start, stop in consecutive_runs(flat)]
                return np.concatenate(parts).reshape(*sel.shape, *arr.shape[1:])
            return np.asarray(arr[int(sel) if isinstance(sel, np.ndarray) else sel])  # type: ignore[index]
        except (ValueError, RuntimeError) as exc:  # a shard that does not decode (truncated, bit rot)
            if isinstance(exc, RuntimeError) and _is_shutdown(exc):
                raise  # the interpreter is exiting under a reading thread: nothing is damaged
            ids = np.arange(self.n_images)[sel] if isinstance(sel, slice) else np.asarray(sel).reshape(-1)
            raise self._corrupt(path, ids, f"does not decode ({exc})") from None

    def _shard_file(self, path: str, image: int) -> str:
        ndim = len(self._array(path).shape)
        return f"{self.url}/{path}/c/{int(image) // self.attrs.chunk}" + "/0" * (ndim - 1)

    def _corrupt(self, path: str, ids: np.ndarray, what: str) -> CorruptStoreError:
        ids = np.asarray(ids).reshape(-1)
        shown = ", ".join(str(int(i)) for i in ids[:5]) + (", …" if ids.size > 5 else "")
        files = sorted({self._shard_file(path, int(i)) for i in ids[:20]})
        return CorruptStoreError(f"{path} of image(s) {shown} {what}: {', '.join(files[:3])}; the store "
                                 f"is damaged there (restore the file, or rebuild the store)")

    def _check_present(self, path: str, images: ImageSelection, data: np.ndarray) -> np.ndarray:
        """Rows of images marked ok are never all zero (the build refuses such rows), so an
        all-zero ok row is a shard that is missing — Zarr reads it as fill values — never data."""
        ids, scalar = self.image_ids(images)
        if ids.size == 0:
            return data
        rows = np.ascontiguousarray(data).reshape(len(ids), -1) if not scalar else data.reshape(1, -1)
        ok = self.table().ok[ids]
        missing = ok & ~np.any(rows.view(np.uint8), axis=1)  # bytes: ~4x faster than float16
        if np.any(missing):
            raise self._corrupt(path, ids[missing], "are missing (read as zeros)")
        return data

    def pixels(self, images: ImageSelection) -> np.ndarray:
        """uint8 (S, S, 3) for one image id, (n, S, S, 3) for several: the exact model input."""
        return self._read(PIXELS, images)

    def vectors(self, layer: str, images: ImageSelection) -> np.ndarray:
        """float16 unit patch vectors (…, H, W, D) for the selected images.

        A missing or undecodable shard of an ok image is a :class:`CorruptStoreError` naming the
        images and the file, never zeros."""
        self.geometry(layer)
        path = layer_path(layer, "vectors")
        return self._read(path, images, check=True)

    def norms(self, layer: str, images: ImageSelection) -> np.ndarray:
        """float32 original activation norms (…, H, W) (missing shards raise, as for vectors)."""
        self.geometry(layer)
        path = layer_path(layer, "norms")
        return self._read(path, images, check=True)

    def vectors_dask(self, layer: str) -> dask.array.Array:
        """All committed vectors of a layer as a lazy dask array chunked by shard."""
        import dask.array as da

        g = self.geometry(layer)
        arr = self._array(layer_path(layer, "vectors"))
        lazy = da.from_zarr(arr, chunks=(self.attrs.chunk, g.height, g.width, g.dim))
        return lazy[: self.n_images]

    def patch_vectors(self, layer: str, ids: np.ndarray) -> np.ndarray:
        """float16 (k, D) vectors for global patch ids, reading one image chunk per distinct image."""
        g = self.geometry(layer)
        image, y, x = patch_coords(np.asarray(ids), g, self.n_images)
        if image.size == 0:
            return np.empty((0, g.dim), dtype=np.float16)
        uniq, inverse = np.unique(image, return_inverse=True)
        path = layer_path(layer, "vectors")
        blocks = self._read(path, uniq, check=True)  # (u, H, W, D), a chunk each
        return blocks[inverse, y, x]

    def patch_id(self, layer: str, image: int, y: int, x: int) -> int:
        return int(patch_id(image, y, x, self.geometry(layer), self.n_images))

    def patch_coords(self, layer: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return patch_coords(ids, self.geometry(layer), self.n_images)

    # ------------------------------------------------------------------- table
    def table(self) -> ImageTable:
        """The committed rows of the image table (cached until the next commit)."""
        if self._table is None:
            n, version = self.n_images, self.attrs.format_version
            core, meta = store_columns(self.attrs.metadata)
            self._table = ImageTable(
                {c: read_column(self.group, column, n, format_version=version) for c, column in core.items()},
                {c: read_column(self.group, column, n, format_version=version) for c, column in meta.items()})
        return self._table

    def __repr__(self) -> str:
        return f"StoreReader({self.url!r}, images={self.n_images}, layers={self.layers})"


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_store(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
               row_cache_bytes: int = 0) -> StoreReader:
    """Open a store read-only by local path or fsspec URL (``row_cache_bytes``: keep up to that
    many bytes of decoded image rows for re-reads, as a server does; 0: none)."""
    return StoreReader(url, storage_options=storage_options, row_cache_bytes=row_cache_bytes)
