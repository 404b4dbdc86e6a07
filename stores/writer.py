"""Writing a store: create, append image blocks, publish commits.

Appending is the normal case. The protocol that keeps readers safe and runs resumable:

1. :meth:`StoreWriter.reserve` resizes every per-image array to ``committed + n`` (dropping any
   tail a crashed run left behind), so new rows are invisible: readers stop at ``committed``.
2. Blocks of rows are written (in parallel, from any process) with :func:`write_image_block`.
   Each block writes whole shards except at its ends, and Zarr's local store writes files
   atomically, so a concurrent reader sees either the old or the new bytes of a chunk.
3. :meth:`StoreWriter.commit` writes the table rows and then, last, the ``committed`` count.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.codecs

from ._zarr import array, open_root, read_attrs
from .errors import StoreError, StoreMismatchError, UnknownLayerError
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    NORMS_DIMS,
    PIXELS,
    PIXELS_DIMS,
    TABLE,
    VECTORS_DIMS,
    StoreAttrs,
    layer_path,
)
from .geometry import LayerGeometry
from .pixels import LEGACY_PIXEL_CODEC, PixelCodec
from .table import (
    Column,
    cache_arrays,
    column_array,
    create_column,
    reserve_string_column,
    rows_to_columns,
    store_columns,
    write_column,
)
from .urls import normalize_url
from .vectors import normalize_patches


def _now(timespec: str = "seconds") -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("hoverlay")
    except Exception:  # running from a source tree without installing
        return "0+unknown"


def _compressor() -> zarr.codecs.BloscCodec:
    # Byte shuffle groups the high bytes of fp16 values, which zstd then compresses well;
    # ReLU-like activations have many exact zeros. Level 1, not 3: on EfficientNet-Lite0's
    # patch vectors level 1 is 2.5x cheaper to encode (4.0 vs 10.2 ms of CPU per image, the
    # largest cost of a build after the forward) and 2.5% *smaller* (313 vs 321 kB per image).
    return zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def create_store(
    url: str | os.PathLike[str],
    *,
    model: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    image_size: int,
    layers: Mapping[str, LayerGeometry],
    chunk: int = 16,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    pixels: PixelCodec | None = None,
) -> StoreWriter:
    """Create an empty store (0 committed images) with one array group per layer.

    ``chunk`` is the number of images per shard along N: the unit of parallel writes and of
    dask reads. Inside a shard each image is its own chunk so a reader can fetch one image's
    patches without decoding its neighbours.

    ``pixels`` is the pixel codec (:class:`~hoverlay.stores.pixels.PixelCodec`). The default here
    is lossless zstd, which any Zarr v3 reader decodes and which keeps whatever a caller writes
    bit for bit; ``hoverlay build`` passes its ``--pixel-codec``/``--pixel-quality`` (JPEG 90 by
    default), which makes the pixels ~8x smaller.
    """
    if not layers:
        raise ValueError("a store needs at least one layer")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    url = normalize_url(url)
    kwargs: dict[str, Any] = {"storage_options": storage_options} if storage_options and "://" in url else {}
    fs, path = fsspec.core.url_to_fs(url, **kwargs.get("storage_options", {}))
    if not overwrite and fs.exists(f"{path.rstrip('/')}/zarr.json"):
        raise StoreError(f"{url!r} already exists; open it to append or pass overwrite=True")
    # mode "a" rather than "w-": the folder may already hold the build's lock file
    group = zarr.open_group(url, mode="w" if overwrite else "a", zarr_format=3, **kwargs)
    now = _now()
    attrs = StoreAttrs(model=dict(model), preprocessing=dict(preprocessing), image_size=int(image_size),
                       layers=dict(layers), chunk=int(chunk), committed=0,
                       created=_now("microseconds"), updated=now,  # created also names this store
                       tool_version=_tool_version(), metadata=dict(metadata or {}),
                       pixels=pixels or LEGACY_PIXEL_CODEC)
    s = attrs.image_size
    group.create_array(PIXELS, shape=(0, s, s, 3), dtype="uint8", chunks=(1, s, s, 3),
                       shards=(chunk, s, s, 3), fill_value=0, dimension_names=PIXELS_DIMS,
                       **attrs.pixels.zarr_codecs())
    core, meta = store_columns(attrs.metadata)
    for column in [*core.values(), *meta.values()]:
        create_column(group, column, format_version=FORMAT_VERSION)
    for name, g in layers.items():  # each layer its own group: y, x are its own (H, W)
        group.create_array(layer_path(name, "vectors"), shape=(0, g.height, g.width, g.dim),
                           dtype="float16", chunks=(1, g.height, g.width, g.dim),
                           shards=(chunk, g.height, g.width, g.dim), compressors=_compressor(),
                           fill_value=0, dimension_names=VECTORS_DIMS)
        group.create_array(layer_path(name, "norms"), shape=(0, g.height, g.width), dtype="float32",
                           chunks=(chunk, g.height, g.width), compressors=_compressor(), fill_value=0,
                           dimension_names=NORMS_DIMS)
    group.attrs.update({FORMAT_NAME: attrs.to_json()})
    return StoreWriter(group, url)


class StoreWriter:
    """Append-side handle on a store. One writer per store at a time (see :mod:`stores.lock`)."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self.attrs = read_attrs(group, url)
        cache_arrays(group)  # the table's arrays stay open between commits (see there)

    @classmethod
    def open(cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> StoreWriter:
        url = normalize_url(url)
        return cls(open_root(url, mode="r+", storage_options=storage_options), url)

    @property
    def committed(self) -> int:
        return self.attrs.committed

    @property
    def layers(self) -> dict[str, LayerGeometry]:
        return self.attrs.layers

    def check_compatible(self, *, model: Mapping[str, Any], preprocessing: Mapping[str, Any],
                         image_size: int, layers: Sequence[str]) -> None:
        """Refuse to append activations of another model, preprocessing or layer set."""
        a = self.attrs
        if dict(model) != a.model:
            raise StoreMismatchError(f"store {self.url!r} was built with model {a.model}, not {dict(model)}")
        if dict(preprocessing) != a.preprocessing or int(image_size) != a.image_size:
            raise StoreMismatchError(
                f"store {self.url!r} was built with preprocessing {a.preprocessing} at "
                f"{a.image_size}px, not {dict(preprocessing)} at {image_size}px")
        if list(layers) != list(a.layers):
            raise StoreMismatchError(f"store {self.url!r} has layers {list(a.layers)}, not {list(layers)}")

    def known_hashes(self) -> dict[str, int]:
        """Content hash -> image id for every committed image (failed ones too)."""
        n = self.committed
        if n == 0:
            return {}
        hashes = np.asarray(array(self.group, f"{TABLE}/hash")[:n])
        return {str(h): i for i, h in enumerate(hashes)}

    def _columns(self) -> list[Column]:
        """Every per-image column: the core table's, then the metadata's."""
        core, meta = store_columns(self.attrs.metadata)
        return [*core.values(), *meta.values()]

    def _per_image_arrays(self) -> list[zarr.Array]:
        """Every per-image array but the string columns (:func:`reserve_string_column` does those)."""
        arrays = [array(self.group, PIXELS)]
        arrays += [column_array(self.group, c.path) for c in self._columns() if c.kind != "str"]
        for name in self.layers:
            arrays += [array(self.group, layer_path(name, "vectors")), array(self.group, layer_path(name, "norms"))]
        return arrays

    def reserve(self, n: int) -> int:
        """Make room for ``n`` rows after the last commit; returns the first new row.

        Rows a crashed run wrote past ``committed`` are dropped here, so a rerun starts clean.
        """
        start = self.committed
        for arr in self._per_image_arrays():
            arr.resize((start + n, *arr.shape[1:]))
        for column in self._columns():
            if column.kind == "str":
                reserve_string_column(self.group, column.path, start, n,
                                      format_version=self.attrs.format_version)
        return start

    def write_block(self, start: int, pixels: np.ndarray, activations: Mapping[str, np.ndarray]) -> None:
        write_image_block(self.group, start, pixels, activations, self.layers)

    def block_writer(self) -> BlockWriter:
        """A :class:`BlockWriter` on this store's arrays as they are now (after :meth:`reserve`)."""
        return BlockWriter(self.group, self.layers)

    def write_table(self, start: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Table rows ``start .. start+len(rows)``, after :meth:`reserve` and in row order (string
        columns store each row's bytes after the previous row's)."""
        columns = rows_to_columns(rows)
        for col, values in columns.items():
            arr = column_array(self.group, f"{TABLE}/{col}")
            if start + len(values) > arr.shape[0]:
                raise StoreError(f"table rows {start}..{start + len(values)} exceed reserved "
                                 f"{arr.shape[0]} rows; call reserve() first")
        core, _ = store_columns({})
        for col, values in columns.items():
            write_column(self.group, core[col], start, values, format_version=self.attrs.format_version)

    def check_metadata(self, kinds: Mapping[str, str] | None) -> None:
        """Refuse metadata columns other than the store's (names and kinds): a store's columns are
        declared when it is created, so every image has the same ones."""
        problem = metadata_mismatch(self.url, self.attrs.metadata, kinds)
        if problem:
            raise StoreMismatchError(problem)

    def write_metadata(self, start: int, columns: Mapping[str, Sequence[Any]]) -> None:
        """Metadata rows ``start .. start+n`` (after :meth:`reserve`, in row order like
        :meth:`write_table`); ``columns`` holds every metadata column of the store."""
        if set(columns) != set(self.attrs.metadata):
            raise StoreMismatchError(f"metadata columns {sorted(columns)} are not the store's "
                                     f"{sorted(self.attrs.metadata)}")
        _, meta = store_columns(self.attrs.metadata)
        for col, column in meta.items():
            values = columns[col]
            write_column(self.group, column, start, list(values) if column.kind == "str" else values,
                         format_version=self.attrs.format_version)

    def commit(self, committed: int, extra: Mapping[str, Any] | None = None) -> None:
        """Publish the first ``committed`` rows to readers; this write is the last of an append."""
        reserved = array(self.group, PIXELS).shape[0]
        if not self.committed <= committed <= reserved:
            raise StoreError(f"cannot commit {committed} rows: committed={self.committed}, "
                             f"reserved={reserved}")
        self.attrs.committed = int(committed)
        self.attrs.updated = _now()
        if extra:
            self.attrs.extra.update(extra)
        self.group.attrs.update({FORMAT_NAME: self.attrs.to_json()})


def write_image_block(group: zarr.Group, start: int, pixels: np.ndarray,
                      activations: Mapping[str, np.ndarray],
                      layers: Mapping[str, LayerGeometry]) -> None:
    """Write pixels and per-layer patch vectors for rows ``start .. start+len(pixels)``.

    ``activations[layer]`` is float32 (b, H, W, D); it is split into unit fp16 vectors and
    float32 norms here (:func:`~hoverlay.stores.normalize_patches`).
    """
    unknown = set(activations) - set(layers)
    if unknown:
        raise UnknownLayerError(f"unknown layer(s) {sorted(unknown)}; store has {list(layers)}")
    for name, acts in activations.items():
        _check_shape(name, acts.shape, len(pixels), layers[name])
    BlockWriter(group, {name: layers[name] for name in activations}).write(
        start, pixels, {name: normalize_patches(acts) for name, acts in activations.items()})


def _check_shape(name: str, shape: tuple[int, ...], b: int, g: LayerGeometry) -> None:
    if shape != (b, g.height, g.width, g.dim):
        raise StoreMismatchError(f"layer {name!r}: activations of shape {shape}, store "
                                 f"expects {(b, g.height, g.width, g.dim)}")


class BlockWriter:
    """The per-image arrays of a store, opened once, for writing blocks of rows.

    Opening an array reads and parses its ``zarr.json``; a build writes ~16 images per block
    into 1 + 2·layers arrays, so a worker keeps one of these per store and build instead of
    opening every array for every block. Its shapes are the ones at opening: open it after
    :meth:`StoreWriter.reserve`.
    """

    def __init__(self, group: zarr.Group, layers: Mapping[str, LayerGeometry]):
        self.layers = dict(layers)
        self.pixels = _writing(array(group, PIXELS))
        self.arrays = {name: (_writing(array(group, layer_path(name, "vectors"))),
                              _writing(array(group, layer_path(name, "norms"))))
                       for name in self.layers}

    def write(self, start: int, pixels: np.ndarray,
              vectors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Rows ``start .. start+len(pixels)``: uint8 pixels and, per layer, the (float16 unit
        vectors, float32 norms) pair of :func:`~hoverlay.stores.normalize_patches`."""
        self.check(len(pixels), vectors)
        self.write_pixels(start, pixels)
        self.write_vectors(start, vectors)

    def check(self, b: int, vectors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Refuse, before writing anything, vectors of unknown layers or of other shapes."""
        unknown = set(vectors) - set(self.layers)
        if unknown:
            raise UnknownLayerError(f"unknown layer(s) {sorted(unknown)}; store has {list(self.layers)}")
        for name, (unit, norms) in vectors.items():
            _check_shape(name, unit.shape, b, self.layers[name])
            if unit.dtype != np.float16 or norms.shape != unit.shape[:-1]:
                raise StoreMismatchError(f"layer {name!r}: vectors must be float16 (b, H, W, D) with "
                                         f"(b, H, W) norms, got {unit.dtype} {unit.shape} / {norms.shape}")

    def write_pixels(self, start: int, pixels: np.ndarray) -> None:
        self.pixels[start:start + len(pixels)] = np.asarray(pixels, dtype=np.uint8)

    def write_vectors(self, start: int, vectors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        for name, (unit, norms) in vectors.items():
            vec, nrm = self.arrays[name]
            vec[start:start + len(unit)] = unit
            nrm[start:start + len(unit)] = np.asarray(norms, dtype=np.float32)


def _writing(arr: zarr.Array) -> zarr.Array:
    """The array with ``write_empty_chunks``: Zarr otherwise compares every chunk with the fill
    value before encoding it (``np.array_equal`` with NaN handling), which cost more CPU than
    blosc itself on float16 vectors (py-spy: 4.5% vs 1.5% of a write loop's samples; the write
    ~20% cheaper without it). An all-zero chunk — a failed image's — is then stored, a few bytes."""
    return arr.with_config({"write_empty_chunks": True})


def metadata_mismatch(url: str, own: Mapping[str, str], kinds: Mapping[str, str] | None) -> str | None:
    """Why metadata columns ``kinds`` cannot be appended to a store that has ``own``, or None."""
    if kinds is None or dict(kinds) == dict(own):
        return None
    if not own:
        return (f"store {url!r} has no metadata columns; they are declared when a store is created: "
                f"build a new store with --metadata")
    return (f"store {url!r} has the metadata columns {_kinds_text(own)}, not {_kinds_text(kinds)}; "
            f"give a metadata file with the store's columns")


def _kinds_text(kinds: Mapping[str, str]) -> str:
    return ", ".join(f"{k} ({'text' if v == 'str' else 'number'})" for k, v in kinds.items()) or "none"
