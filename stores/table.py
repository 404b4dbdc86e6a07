"""The per-image table: one Zarr array per column under ``images/table``.

Columns (not rows) because every consumer wants one or two columns for many images
(hashes for deduplication, labels for filtering) and Zarr appends columns cheaply.

String columns are created, reserved, written and read only through
:func:`create_string_column`, :func:`reserve_string_column`, :func:`write_string_column` and
:func:`read_string_column` (the core table and the user's metadata columns alike), because
their on-disk form depends on the store's format version (docs/store-format.md,
"String columns"): version 1 has zarr-python's ``string`` array only; version 2 adds UTF-8
bytes + end offsets in core Zarr types, which other Zarr v3 readers (tensorstore) read.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from .errors import CorruptStoreError, StoreError
from .format import (
    ENDS_SUFFIX,
    STATUS_OK,
    STRING_UTF8_SINCE,
    TABLE,
    TABLE_COLUMNS,
    TABLE_DIMS,
    UTF8_SUFFIX,
    metadata_path,
)

#: Rows per chunk of a table column (and of a string column's ``.ends``).
TABLE_CHUNK = 4096
#: Bytes per chunk of a string column's ``.utf8``.
UTF8_CHUNK = 1 << 16
#: ``.ends`` of a row that is not written yet (its fill value).
UNWRITTEN = -1

_DEFAULTS: dict[str, Any] = {
    "source": "", "label": "", "hash": "", "base_id": -1, "transform": "none",
    "param": 0.0, "status": STATUS_OK, "reason": "",
}


def rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Rows (dicts, missing keys take defaults) -> one numpy array per column.

    Unknown keys are an error: a typo would otherwise silently lose data.
    """
    unknown = {k for row in rows for k in row} - set(TABLE_COLUMNS)
    if unknown:
        raise ValueError(f"unknown table column(s) {sorted(unknown)}; known: {list(TABLE_COLUMNS)}")
    out: dict[str, np.ndarray] = {}
    for col, kind in TABLE_COLUMNS.items():
        values = [row.get(col, _DEFAULTS[col]) for row in rows]
        if kind == "str":  # object, not numpy's "U", which drops trailing NULs
            out[col] = np.empty(len(values), dtype=object)
            out[col][:] = [v if isinstance(v, str) else str(v) for v in values]
        else:
            out[col] = np.array(values, dtype=kind)
    return out


# ============================================================================ string columns
def string_column_paths(path: str, *, format_version: int) -> tuple[str, ...]:
    """The arrays a string column at ``path`` consists of: ``(path,)`` in version 1;
    ``(path, path + ".utf8", path + ".ends")`` since version 2."""
    if format_version >= STRING_UTF8_SINCE:
        return path, path + UTF8_SUFFIX, path + ENDS_SUFFIX
    return (path,)


def is_string_companion(name: str) -> bool:
    """Whether an array name is a string column's companion (``x.utf8``, ``x.ends``), not a column:
    code that lists a group's columns skips these."""
    return name.endswith((UTF8_SUFFIX, ENDS_SUFFIX))


def create_string_column(group: zarr.Group, path: str, *, format_version: int, fill: str = "",
                         chunk: int = TABLE_CHUNK) -> None:
    """Create an empty string column at ``path`` (relative to the store's root ``group``) in the
    form of ``format_version`` (the store's: ``StoreAttrs.format_version``).

    Version 2: ``path`` (``string``, fill ``fill``, dims ``(image,)``), ``path.utf8`` (uint8,
    dims ``(<name>.byte,)``), ``path.ends`` (int64, fill -1, dims ``(image,)``).
    """
    v2 = format_version >= STRING_UTF8_SINCE
    group.create_array(path, shape=(0,), dtype=str, chunks=(chunk,), fill_value=fill,
                       dimension_names=TABLE_DIMS if v2 else None)
    if v2:
        name = path.rsplit("/", 1)[-1]
        group.create_array(path + UTF8_SUFFIX, shape=(0,), dtype="uint8", chunks=(UTF8_CHUNK,),
                           fill_value=0, compressors=zarr.codecs.ZstdCodec(level=3),
                           dimension_names=(f"{name}.byte",))
        group.create_array(path + ENDS_SUFFIX, shape=(0,), dtype="int64", chunks=(chunk,),
                           fill_value=UNWRITTEN, dimension_names=TABLE_DIMS)


#: Opened arrays of the groups a writer registered (:func:`cache_arrays`), by ``id(group)``.
_ARRAY_CACHES: dict[int, dict[str, zarr.Array]] = {}


def cache_arrays(group: zarr.Group) -> None:
    """Keep the column arrays of ``group`` open for as long as it lives.

    A wave's table write touches ~25 arrays (three per text column) and opening one reads and
    parses its ``zarr.json``: a third of a commit's time. Only a writer does this — it holds the
    store's lock, so nobody else resizes these arrays, and its own resizes update the opened
    arrays in place; a reader opens afresh, as another process may have grown them."""
    key = id(group)
    _ARRAY_CACHES[key] = {}
    weakref.finalize(group, _ARRAY_CACHES.pop, key, None)


def column_array(group: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path`` (kept open when :func:`cache_arrays` registered ``group``)."""
    return _arr(group, path)


def _arr(group: zarr.Group, path: str) -> zarr.Array:
    cache = _ARRAY_CACHES.get(id(group))
    if cache is not None and path in cache:
        return cache[path]
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise CorruptStoreError(f"{path!r} in the store is a group, not an array")
    if cache is not None:
        cache[path] = node
    return node


def _end_before(ends: zarr.Array, row: int, path: str) -> int:
    """Where row ``row``'s bytes start: the largest end of a written row before it (0 if none)."""
    if row == 0:
        return 0
    end = int(np.asarray(ends[row - 1]))
    if end == UNWRITTEN:  # rows committed without table values (rare): look further back
        prior = np.asarray(ends[: row - 1], dtype=np.int64)
        if np.any(prior < UNWRITTEN):
            raise CorruptStoreError(f"{path}{ENDS_SUFFIX} holds negative ends: the column is damaged")
        end = max(0, int(prior.max(initial=0)))
    elif end < 0:
        raise CorruptStoreError(f"{path}{ENDS_SUFFIX}[{row - 1}] = {end}: the column is damaged")
    return end


def reserve_string_column(group: zarr.Group, path: str, committed: int, n: int, *,
                          format_version: int) -> None:
    """Make the column ``committed + n`` rows long for rows about to be written, dropping what a
    crashed run wrote past ``committed`` (its bytes too): the column's part of
    :meth:`StoreWriter.reserve <hoverlay.stores.writer.StoreWriter.reserve>`. Rows that are
    reserved and never written read as the column's fill value."""
    rows = committed + n
    strings = _arr(group, path)
    strings.resize((rows,))
    if n:  # Zarr keeps a crashed run's values in a chunk that a resize cuts through
        strings[committed:rows] = np.full(n, str(strings.fill_value), dtype=object)
    if format_version < STRING_UTF8_SINCE:
        return
    ends, utf8 = _arr(group, path + ENDS_SUFFIX), _arr(group, path + UTF8_SUFFIX)
    base = _end_before(ends, committed, path)
    ends.resize((rows,))
    if n:
        ends[committed:rows] = UNWRITTEN  # a crashed run's ends would otherwise pass as written
    utf8.resize((base,))


def write_string_column(group: zarr.Group, path: str, start: int, values: Sequence[str] | np.ndarray,
                        *, format_version: int) -> None:
    """Write ``values`` (str, any unicode) into rows ``start .. start+len(values)``.

    The rows must be reserved (:func:`reserve_string_column`) and are written in row order,
    once per reserve: version 2 stores each row's bytes after those of the rows before it, so
    a row after the block must not be written yet. A value that is not a ``str``, or a string
    UTF-8 cannot hold (lone surrogates), is a ``ValueError``; nothing is written then.
    """
    texts = [str(v) if isinstance(v, np.str_) else v for v in values]
    bad = next((v for v in texts if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: string column values must be str, got {bad!r}")
    n = len(texts)
    arr = _arr(group, path)
    if start < 0 or start + n > arr.shape[0]:
        raise StoreError(f"{path}: rows {start}..{start + n} exceed the {arr.shape[0]} reserved rows; "
                         f"reserve them first")
    if n == 0:
        return
    if format_version >= STRING_UTF8_SINCE:
        try:
            encoded = [t.encode("utf-8") for t in texts]
        except UnicodeEncodeError as exc:
            raise ValueError(f"{path}: a value is not valid unicode text ({exc})") from None
        ends, utf8 = _arr(group, path + ENDS_SUFFIX), _arr(group, path + UTF8_SUFFIX)
        if start + n < ends.shape[0] and int(np.asarray(ends[start + n])) != UNWRITTEN:
            raise StoreError(f"{path}: row {start + n} is already written; string columns are "
                             f"written in row order, once per reserve")
        base = _end_before(ends, start, path)
        new_ends = base + np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=n))
        stop = int(new_ends[-1])
        utf8.resize((stop,))
        if stop > base:
            utf8[base:stop] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        ends[start:start + n] = new_ends  # after the bytes: a row exists once its end does
    column = np.empty(n, dtype=object)  # object, not numpy's "U", which drops trailing NULs
    column[:] = texts
    arr[start:start + n] = column


def read_string_column(group: zarr.Group, path: str, stop: int, *, format_version: int,
                       start: int = 0) -> np.ndarray:
    """Rows ``start .. stop`` of a string column as an object array of ``str``.

    Version 2 reads the UTF-8 bytes and ends (the form every Zarr v3 reader can read, so outside
    readers get the same values); version 1 the ``string`` array. Rows never written read as the
    column's fill value, as Zarr reads them from the ``string`` array. Ends that go backwards or
    past the bytes, or bytes that are not UTF-8, are a :class:`CorruptStoreError` naming the column.
    """
    if stop <= start:
        return np.empty(0, dtype=object)
    strings = _arr(group, path)
    if format_version < STRING_UTF8_SINCE:
        return np.asarray(strings[start:stop]).astype(object)
    ends_arr, utf8 = _arr(group, path + ENDS_SUFFIX), _arr(group, path + UTF8_SUFFIX)
    if stop > ends_arr.shape[0]:
        raise CorruptStoreError(f"{path}{ENDS_SUFFIX} holds {ends_arr.shape[0]} rows, not {stop}: "
                                f"the column is damaged")
    base = _end_before(ends_arr, start, path)
    ends = np.asarray(ends_arr[start:stop], dtype=np.int64)
    written = ends != UNWRITTEN
    # row i starts where the last written row before it ends
    starts = np.maximum.accumulate(np.concatenate([[base], np.where(written, ends, 0)]))
    backwards = np.flatnonzero(written & (ends < starts[:-1]))
    if backwards.size or starts[-1] > utf8.shape[0]:
        row = start + int(backwards[0]) if backwards.size else stop - 1
        raise CorruptStoreError(f"{path}{ENDS_SUFFIX} is damaged at row {row} (ends "
                                f"{ends[max(0, row - start - 2):row - start + 2].tolist()}, "
                                f"{utf8.shape[0]} bytes in {path}{UTF8_SUFFIX}): the column is unreadable")
    blob = np.asarray(utf8[base:int(starts[-1])]).tobytes()
    lo, hi = (starts[:-1] - base).tolist(), (np.where(written, ends, starts[:-1]) - base).tolist()
    try:
        text = blob.decode("utf-8")
        piece = text if len(text) == len(blob) else None  # ASCII: byte offsets are character offsets
        out = [piece[a:b] if piece is not None else blob[a:b].decode("utf-8")
               for a, b in zip(lo, hi, strict=True)]
    except UnicodeDecodeError as exc:
        raise CorruptStoreError(f"{path}{UTF8_SUFFIX} is not UTF-8 ({exc}): the column is damaged") from None
    result = np.empty(len(out), dtype=object)
    result[:] = out
    if not np.all(written):
        result[~written] = str(strings.fill_value)
    return result


# ==================================================================================== table
# ======================================================================== per-image columns
@dataclass(frozen=True)
class Column:
    """One per-image column of a store: a core table column or a user's metadata column."""

    path: str    # the array's path in the store
    kind: str    # "str", or a numpy dtype name
    fill: Any    # what a row without a value holds


def store_columns(metadata: Mapping[str, str]) -> tuple[dict[str, Column], dict[str, Column]]:
    """(core table columns, metadata columns) by name, for a store whose metadata columns are
    ``metadata`` (``StoreAttrs.metadata``): text metadata misses as "", numbers as NaN."""
    core = {c: Column(f"{TABLE}/{c}", kind, _DEFAULTS[c]) for c, kind in TABLE_COLUMNS.items()}
    meta = {c: Column(metadata_path(c), kind, "" if kind == "str" else np.nan) for c, kind in metadata.items()}
    return core, meta


def create_column(group: zarr.Group, column: Column, *, format_version: int) -> None:
    """An empty column (dimension ``image``) in the form of ``format_version``."""
    if column.kind == "str":
        create_string_column(group, column.path, format_version=format_version, fill=column.fill)
    else:
        group.create_array(column.path, shape=(0,), dtype=column.kind, chunks=(TABLE_CHUNK,),
                           fill_value=column.fill, dimension_names=TABLE_DIMS)


def write_column(group: zarr.Group, column: Column, start: int, values: Sequence[Any] | np.ndarray,
                 *, format_version: int) -> None:
    """Rows ``start .. start+len(values)`` of a column (reserved, in row order for text)."""
    if column.kind == "str":
        write_string_column(group, column.path, start, values, format_version=format_version)
    else:
        _arr(group, column.path)[start:start + len(values)] = np.asarray(values, dtype=column.kind)


def read_column(group: zarr.Group, column: Column, stop: int, *, format_version: int) -> np.ndarray:
    """Rows ``0 .. stop`` of a column (text as an object array of ``str``)."""
    if column.kind == "str":
        return read_string_column(group, column.path, stop, format_version=format_version)
    return np.asarray(_arr(group, column.path)[:stop], dtype=column.kind)


@dataclass
class ImageTable:
    """Committed rows of ``images/table`` as numpy columns (row index = image id).

    ``metadata`` holds the user's own columns (``build --metadata``), apart from the core
    columns so that a user's column can never shadow ``hash`` or ``status``.
    """

    columns: dict[str, np.ndarray]
    metadata: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns["hash"])

    def __getitem__(self, column: str) -> np.ndarray:
        return self.columns[column]

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of images that decoded and have vectors."""
        return self.columns["status"] == STATUS_OK

    def row(self, image: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for col, values in self.columns.items():
            v = values[image]
            out[col] = v.item() if isinstance(v, np.generic) else v
        return out
