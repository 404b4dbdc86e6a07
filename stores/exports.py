"""Exports: the top-k patches of queries as a table, and a layer's patch vectors as shards.

Hits are found by :class:`~hoverlay.stores.search.LayerSearch`, the search the explorer's top-k
panel uses (FAISS candidates re-ranked exactly from the stored vectors, or an exact scan), so a
file exported here holds the scores the explorer shows. A hits table has one row per hit:

``query, query_image, query_y, query_x, rank, layer, image, source, label, y, x, patch_id,
score`` and then every user metadata column of the store (``ImageTable.metadata``; a user column
whose name is one of these is written as ``metadata_<name>``). ``query`` is the query's 0-based
position in the input, ``rank`` starts at 1, ``score`` is the exact cosine (float32).

Vectors are exported as autofaiss reads them: ``.npy`` shards of ``(n, D)`` embeddings in
``DIR/embeddings/`` with a matching ``int64 (n, 4)`` ids file (image, y, x, patch id) per shard
in ``DIR/ids/``, or Parquet shards in ``DIR/`` with an ``embedding`` list column and the id
columns ``image, y, x, patch_id``; ``DIR/manifest.json`` describes either. Only committed images
whose status is ok are exported.

Everything is checked before anything is written (an output extension, the queries, the layer,
every coordinate), and every file appears whole or not at all: written to a temporary file or
folder beside the target and renamed onto it. Parquet needs pyarrow (``pip install
'hoverlay[export]'``); CSV needs nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from hoverlay.errors import MissingDependencyError, UsageError

from .errors import OutOfRangeError, StoreError
from .geometry import LayerGeometry, patch_coords
from .localfiles import temp_file_in, umask
from .reader import StoreReader, open_store
from .search import LayerSearch, TopK, iter_vector_blocks
from .urls import normalize_url

#: File formats of ``export hits`` (by the output's extension) and of ``export vectors``.
HIT_FORMATS = ("parquet", "csv")
VECTOR_FORMATS = ("npy", "parquet")
VECTOR_DTYPES = ("float16", "float32")
#: Columns of every hit, after the query's own (``QUERY_COLUMNS``), before the user's metadata.
HIT_COLUMNS = ("layer", "image", "source", "label", "y", "x", "patch_id", "score")
QUERY_COLUMNS = ("query", "query_image", "query_y", "query_x", "rank")
#: Id columns of an exported vector, in the order of a ``.npy`` ids file's columns.
ID_COLUMNS = ("image", "y", "x", "patch_id")
#: Rows per vector shard by default (1M x D=112 float16 is 224 MB).
DEFAULT_SHARD_SIZE = 1_000_000
#: A CSV cell starting with one of these is a formula to a spreadsheet: written with a ``'`` first.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
PYARROW_HINT = "pip install 'hoverlay[export]'"


class ExportInputError(StoreError, ValueError):
    """A queries file, hits file or output location an export cannot take (exit 4)."""


# ==================================================================================== queries
@dataclass(frozen=True)
class HitQuery:
    """One query patch: (image, y, x) of ``layer`` (None: the export's layer)."""

    image: int
    y: int
    x: int
    layer: str | None = None
    #: where the query came from, for messages ("queries.csv line 3")
    where: str = ""


def read_queries_csv(path: str | os.PathLike[str]) -> list[HitQuery]:
    """Queries from a CSV with a header and the columns ``image, y, x`` (and optionally
    ``layer``; an empty cell means the export's layer); other columns are ignored.

    A missing file or column, a row without a value, or a value that is not an integer is an
    :class:`ExportInputError` naming the file, the line and the value.
    """
    where = os.fspath(path)
    try:
        with open(where, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("image", "y", "x") if c not in header]
            if missing:
                raise ExportInputError(f"queries file {where!r} has no column {', '.join(missing)} (its header "
                                       f"is {', '.join(header) if header else 'empty'}; expected image,y,x"
                                       f" and optionally layer)")
            reader.fieldnames = header
            out = []
            for row in reader:
                line = f"{where!r} line {reader.line_num}"
                if not any((v or "").strip() for k, v in row.items() if k is not None):
                    continue  # a blank line
                values = {c: _integer(row.get(c), c, line) for c in ("image", "y", "x")}
                layer = (row.get("layer") or "").strip() or None
                out.append(HitQuery(values["image"], values["y"], values["x"], layer, where=line))
    except FileNotFoundError:
        raise ExportInputError(f"queries file {where!r} not found") from None
    except IsADirectoryError:
        raise ExportInputError(f"queries file {where!r} is a directory") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ExportInputError(f"queries file {where!r} is not a readable CSV file: {exc}") from None
    if not out:
        raise ExportInputError(f"queries file {where!r} has no queries (only a header, or nothing)")
    return out


def _integer(text: str | None, column: str, where: str) -> int:
    value = (text or "").strip()
    try:
        return int(value)
    except ValueError:
        what = "no value" if not value else f"{value!r}, not an integer"
        raise ExportInputError(f"{where}: {column} has {what}") from None


def _as_queries(queries: str | os.PathLike[str] | Sequence[HitQuery | Sequence[int]]) -> list[HitQuery]:
    if isinstance(queries, (str, os.PathLike)):
        return read_queries_csv(queries)
    out = []
    for i, q in enumerate(queries):
        if isinstance(q, HitQuery):
            out.append(q)
            continue
        if len(q) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in q):
            raise UsageError(f"query {i}: {q!r} is not (image, y, x) integers or a HitQuery")
        out.append(HitQuery(int(q[0]), int(q[1]), int(q[2]), where=f"query {i}"))
    if not out:
        raise UsageError("no queries given")
    return out


def check_queries(reader: StoreReader, queries: Sequence[HitQuery], layer: str | None) -> list[tuple[str, int]]:
    """(layer, query patch id) of every query, or the first bad one's error: an unknown layer,
    a coordinate outside the store, or an image that failed to decode (it has no vectors)."""
    ok = reader.table().ok
    reasons = reader.table()["reason"]
    out = []
    for q in queries:
        name = q.layer or layer
        prefix = f"{q.where}: " if q.where else ""
        if not name:
            raise UsageError(f"{prefix}no layer for this query: give --layer (or a layer column); "
                             f"store layers: {', '.join(reader.layers)}")
        try:
            pid = reader.patch_id(name, q.image, q.y, q.x)
        except StoreError as exc:
            raise type(exc)(f"{prefix}{exc}") from None
        if not ok[q.image]:
            raise OutOfRangeError(f"{prefix}image {q.image} failed to decode ({reasons[q.image]}); it has "
                                  f"no vectors to search with")
        out.append((name, pid))
    return out


# ======================================================================================= hits
def hit_columns(reader: StoreReader, layer: str, top: TopK) -> dict[str, np.ndarray]:
    """The columns of a search result, best first: :data:`HIT_COLUMNS` and the user metadata.

    The explorer's top-k download and ``export hits`` both build their rows here."""
    image, y, x = reader.patch_coords(layer, top.ids)
    table = reader.table()
    columns: dict[str, np.ndarray] = {
        "layer": np.full(len(image), layer, dtype=object),
        "image": image.astype(np.int64),
        "source": np.asarray(table["source"], dtype=object)[image],
        "label": np.asarray(table["label"], dtype=object)[image],
        "y": y.astype(np.int64),
        "x": x.astype(np.int64),
        "patch_id": np.asarray(top.ids, dtype=np.int64),
        "score": np.asarray(top.scores, dtype=np.float32),
    }
    for name, values in table.metadata.items():
        key = f"metadata_{name}" if name in columns or name in QUERY_COLUMNS else name
        columns[key] = np.asarray(values)[image]
    return columns


def rows_of(columns: Mapping[str, Sequence[Any] | np.ndarray]) -> list[dict[str, Any]]:
    """Columns -> one dict per row, numpy scalars as Python values."""
    names = list(columns)
    lists = [np.asarray(columns[n]).tolist() for n in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*lists, strict=True)]


def hits_table(reader: StoreReader, queries: Sequence[HitQuery], layer: str | None = None,
               k: int = 32) -> dict[str, np.ndarray]:
    """The top-k hits of every query as columns (:data:`QUERY_COLUMNS`, then
    :func:`hit_columns`'), searched by :class:`LayerSearch` with exact scores.

    Every query is checked first (:func:`check_queries`), before any search."""
    k = _positive(k, "k")
    targets = check_queries(reader, queries, layer)
    searches: dict[str, LayerSearch] = {}
    parts: list[dict[str, np.ndarray]] = []
    for i, (q, (name, pid)) in enumerate(zip(queries, targets, strict=True)):
        search = searches.get(name)
        if search is None:
            search = searches[name] = LayerSearch(reader, name, query_threads=None)
        top = search.search(reader.patch_vectors(name, np.array([pid]))[0], k)
        n = len(top.ids)
        part = {"query": np.full(n, i, dtype=np.int64), "query_image": np.full(n, q.image, dtype=np.int64),
                "query_y": np.full(n, q.y, dtype=np.int64), "query_x": np.full(n, q.x, dtype=np.int64),
                "rank": np.arange(1, n + 1, dtype=np.int64)}
        parts.append(part | hit_columns(reader, name, top))
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


@dataclass(frozen=True)
class HitsExport:
    path: str
    format: str
    queries: int
    rows: int
    layers: tuple[str, ...]

    def summary(self) -> str:
        return (f"wrote {self.rows} hits of {self.queries} quer{'y' if self.queries == 1 else 'ies'} "
                f"({', '.join(self.layers)}) to {self.path}")


def export_hits(store: str | os.PathLike[str] | StoreReader, out: str | os.PathLike[str],
                queries: str | os.PathLike[str] | Sequence[HitQuery | Sequence[int]],
                layer: str | None = None, k: int = 32,
                storage_options: dict[str, Any] | None = None) -> HitsExport:
    """Write the top-``k`` hits of ``queries`` (a CSV path, or (image, y, x) tuples /
    :class:`HitQuery`) to ``out``: ``.parquet`` or ``.csv`` by its extension.

    Output, queries, layers and coordinates are all checked before the first search; the file
    is written to a temporary file beside ``out`` and renamed onto it."""
    path, fmt = check_table_output(out)
    k = _positive(k, "k")
    reader = store if isinstance(store, StoreReader) else open_store(store, storage_options=storage_options)
    qs = _as_queries(queries)
    columns = hits_table(reader, qs, layer, k)
    write_table(columns, path, fmt)
    return HitsExport(path, fmt, len(qs), len(columns["query"]),
                      tuple(dict.fromkeys(np.asarray(columns["layer"]).tolist())))


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name}: {value!r} is not a positive integer")
    return int(value)


# ================================================================================ table files
def check_table_output(out: str | os.PathLike[str]) -> tuple[str, str]:
    """(local path, format) of a hits file to write, or the reason it cannot be written."""
    path = os.fspath(out)
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    if fmt not in HIT_FORMATS:
        raise UsageError(f"--out {path!r}: unknown extension {('.' + fmt) if fmt else '(none)'}; use "
                         f".parquet or .csv")
    if "://" in path and not path.startswith("file://"):
        raise UsageError(f"--out {path!r}: exports are written to a local path")
    path = normalize_url(path) if path.startswith("file://") else path
    _check_local_target(path, folder=False)
    if fmt == "parquet":
        require_pyarrow("Parquet output")
    return path, fmt


def _check_local_target(path: str, folder: bool) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ExportInputError(f"cannot write {path!r}: the folder {parent!r} does not exist")
    if not folder and os.path.isdir(path):
        raise ExportInputError(f"cannot write {path!r}: it is a directory")
    if not os.access(parent, os.W_OK):
        raise ExportInputError(f"cannot write {path!r}: the folder {parent!r} is not writable")


def require_pyarrow(what: str) -> Any:
    """``pyarrow.parquet``, or a :class:`MissingDependencyError` naming the extra."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(f"{what} needs the package pyarrow, which is not installed: "
                                     f"{PYARROW_HINT} (or write .csv)") from None
    return pq


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: strings that a spreadsheet would run as a formula get a leading
    ``'`` (CSV injection); numbers stay numbers (a negative score is not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return value


def csv_uncell(text: str) -> str:
    """Inverse of :func:`csv_cell` for a string cell."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text


def write_csv(columns: Mapping[str, Sequence[Any] | np.ndarray], f: IO[str]) -> None:
    """Columns as CSV (a header row, RFC 4180 quoting, :func:`csv_cell` per value) to ``f``."""
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow([csv_cell(str(c)) for c in columns])
    for row in rows_of(columns):
        writer.writerow([csv_cell(v) for v in row.values()])


def csv_bytes(columns: Mapping[str, Sequence[Any] | np.ndarray]) -> bytes:
    buf = io.StringIO()
    write_csv(columns, buf)
    return buf.getvalue().encode("utf-8")


def _arrow_column(values: np.ndarray) -> Any:
    import pyarrow as pa

    arr = np.asarray(values)
    if arr.dtype == object or arr.dtype.kind in "US":
        return pa.array(arr.tolist())
    return pa.array(arr)


def write_table(columns: Mapping[str, np.ndarray], path: str, fmt: str) -> None:
    """Columns to ``path`` as Parquet or CSV, atomically (temporary file + rename)."""
    with _atomic_file(path) as tmp:
        if fmt == "csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                write_csv(columns, f)
        else:
            import pyarrow as pa

            pq = require_pyarrow("Parquet output")
            pq.write_table(pa.table({c: _arrow_column(v) for c, v in columns.items()}), tmp)


@contextlib.contextmanager
def _atomic_file(path: str) -> Iterator[str]:
    fd, tmp = temp_file_in(os.path.dirname(os.path.abspath(path)), suffix=".part")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_hits(path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """A hits file written by :func:`export_hits` (Parquet or CSV) as columns of Python values."""
    where = os.fspath(path)
    fmt = os.path.splitext(where)[1].lower().lstrip(".")
    if fmt not in HIT_FORMATS:
        raise UsageError(f"hits file {where!r}: unknown extension; expected .parquet or .csv")
    if not os.path.isfile(where):
        raise ExportInputError(f"hits file {where!r} not found")
    if fmt == "parquet":
        pq = require_pyarrow("Reading Parquet")
        try:
            return dict(pq.read_table(where).to_pydict())
        except Exception as exc:  # pyarrow raises its own ArrowInvalid etc.
            raise ExportInputError(f"hits file {where!r} is not a readable Parquet file: {exc}") from None
    with open(where, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ExportInputError(f"hits file {where!r} is empty")
    header = [csv_uncell(h) for h in rows[0]]
    cols: dict[str, list[Any]] = {h: [] for h in header}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ExportInputError(f"hits file {where!r} line {line}: {len(row)} cells, {len(header)} columns")
        for h, cell in zip(header, row, strict=True):
            cols[h].append(csv_uncell(cell))
    return cols


# ==================================================================================== vectors
@dataclass(frozen=True)
class VectorsExport:
    path: str
    format: str
    dtype: str
    layer: str
    vectors: int
    images: int
    shards: int

    def summary(self) -> str:
        return (f"wrote {self.vectors} {self.dtype} vectors of {self.images} images (layer {self.layer}) "
                f"as {self.shards} {self.format} shard{'s' if self.shards != 1 else ''} to {self.path}")


def export_vectors(store: str | os.PathLike[str] | StoreReader, layer: str, out: str | os.PathLike[str],
                   format: str = "npy", shard_size: int = DEFAULT_SHARD_SIZE, dtype: str | None = None,
                   storage_options: dict[str, Any] | None = None) -> VectorsExport:
    """Write every ok image's patch vectors of ``layer`` with their ids to the folder ``out``.

    ``npy``: ``embeddings/part-NNNNN.npy`` (``(n, D)``, float16 by default: the stored values)
    and ``ids/part-NNNNN.npy`` (int64 ``(n, 4)``: image, y, x, patch id) per shard.
    ``parquet``: ``part-NNNNN.parquet`` with columns image, y, x, patch_id (int64) and
    ``embedding`` (a list of float32 by default, the stored float16 values widened exactly;
    ``dtype="float16"`` keeps half floats: pyarrow 17 and 26 write and read them, older
    versions may lack Parquet's float16).
    ``manifest.json`` lists the shards. ``out`` must not exist or be an empty folder; the export
    is written to a temporary folder beside it and renamed onto it.
    """
    if format not in VECTOR_FORMATS:
        raise UsageError(f"format: {format!r} is not one of {', '.join(VECTOR_FORMATS)}")
    dtype = dtype or ("float16" if format == "npy" else "float32")
    if dtype not in VECTOR_DTYPES:
        raise UsageError(f"dtype: {dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")
    shard_size = _positive(shard_size, "shard_size")
    path = os.fspath(out)
    if "://" in path and not path.startswith("file://"):
        raise UsageError(f"--out {path!r}: exports are written to a local folder")
    path = normalize_url(path) if path.startswith("file://") else path
    _check_local_target(path, folder=True)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ExportInputError(f"cannot write vectors to {path!r}: it exists and is not an empty folder "
                               f"(old shards would be read with the new ones); choose a new folder")
    if format == "parquet":
        require_pyarrow("Parquet vectors")
    reader = store if isinstance(store, StoreReader) else open_store(store, storage_options=storage_options)
    g = reader.geometry(layer)
    n_ok = int(reader.table().ok.sum())
    if n_ok == 0:
        raise ExportInputError(f"layer {layer!r} of {reader.url!r} has no vectors to export: the store has "
                               f"no committed image whose status is ok")

    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=".tmp-vectors-", dir=parent)
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: the folder gets a new folder's mode
    try:
        shards = _write_shards(tmp, _rows(reader, layer, shard_size), g, format, dtype)
        manifest = {"format": format, "dtype": dtype, "layer": layer, "dim": g.dim,
                    "height": g.height, "width": g.width, "vectors": sum(s["count"] for s in shards),
                    "images": n_ok, "id_columns": list(ID_COLUMNS), "shards": shards,
                    "store": reader.url, "store_committed": reader.n_images,
                    "store_updated": reader.attrs.updated}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked above); a non-empty one now makes rmdir fail: nothing lost
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return VectorsExport(path, format, dtype, layer, int(manifest["vectors"]), n_ok, len(shards))


def _rows(reader: StoreReader, layer: str, shard_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(patch ids, vectors) in shards of ``shard_size`` rows (the last one smaller), ok images only."""
    ids_buf: list[np.ndarray] = []
    vec_buf: list[np.ndarray] = []
    held = 0
    for ids, vecs in iter_vector_blocks(reader, layer):
        ids_buf.append(ids)
        vec_buf.append(vecs)
        held += len(ids)
        while held >= shard_size:
            all_ids, all_vecs = np.concatenate(ids_buf), np.concatenate(vec_buf)
            yield all_ids[:shard_size], all_vecs[:shard_size]
            ids_buf, vec_buf = [all_ids[shard_size:]], [all_vecs[shard_size:]]
            held -= shard_size
    if held:
        yield np.concatenate(ids_buf), np.concatenate(vec_buf)


def _write_shards(folder: str, shards: Iterable[tuple[np.ndarray, np.ndarray]], geometry: LayerGeometry,
                  fmt: str, dtype: str) -> list[dict[str, Any]]:
    out = []
    if fmt == "npy":
        os.makedirs(os.path.join(folder, "embeddings"))
        os.makedirs(os.path.join(folder, "ids"))
    for n, (pids, vecs) in enumerate(shards):
        name = f"part-{n:05d}"
        count = len(pids)
        if fmt == "npy":
            emb, ids = f"embeddings/{name}.npy", f"ids/{name}.npy"
            np.save(os.path.join(folder, emb), np.ascontiguousarray(vecs, dtype=dtype))
            np.save(os.path.join(folder, ids), pids_table(pids, geometry))
            out.append({"embeddings": emb, "ids": ids, "count": count})
        else:
            import pyarrow as pa

            pq = require_pyarrow("Parquet vectors")
            table = pids_table(pids, geometry)
            values = pa.array(np.ascontiguousarray(vecs, dtype=dtype).reshape(-1))
            dim = vecs.shape[1]
            list_type = pa.ListArray if count * dim < 2**31 else pa.LargeListArray
            offsets = np.arange(0, (count + 1) * dim, dim, dtype=np.int32 if list_type is pa.ListArray else np.int64)
            columns = {c: pa.array(table[:, j]) for j, c in enumerate(ID_COLUMNS)}
            columns["embedding"] = list_type.from_arrays(pa.array(offsets), values)
            file = f"{name}.parquet"
            pq.write_table(pa.table(columns), os.path.join(folder, file))
            out.append({"file": file, "count": count})
    return out


def pids_table(pids: np.ndarray, geometry: LayerGeometry) -> np.ndarray:
    """int64 ``(n, 4)``: image, y, x and patch id of global patch ids (:data:`ID_COLUMNS`)."""
    image, y, x = patch_coords(pids, geometry)
    return np.stack([image, y, x, np.asarray(pids, dtype=np.int64)], axis=1).astype(np.int64)
