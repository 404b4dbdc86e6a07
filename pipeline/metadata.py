"""``build --metadata FILE.csv|.parquet``: the user's own columns, joined to images.

The file has one row per image and a key column:

* ``path``: the image's path relative to the source folder (``cats/tom.jpg``), or its full
  path or URL as the build found it;
* ``file`` (or ``filename``): the image's file name alone (``tom.jpg``), which must then be
  unique among the images of the build.

Every other column becomes a column of the store: numbers (every non-empty value parses as
one) as float64 with NaN where missing, anything else as text with "" where missing. A
``label`` column replaces the folder-name label. Images without a row get missing values, rows
without an image are counted; both appear in the build's summary. Everything here runs before
the build writes anything, so a bad file loses nothing.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hoverlay.stores import filesystem

from .errors import PipelineError
from .sources import ImageSource

KEY_COLUMNS = ("path", "file", "filename")
TEXT, NUMBER = "str", "float64"
#: Columns a metadata file may add (each is an array in the store and a choice in the explorer).
MAX_COLUMNS = 64
#: A column name: letters, digits, ``_ - ( )`` and spaces, up to 64 characters; it becomes a
#: Zarr array name (no dots: ``x.utf8`` is a text column's companion), a URL value and a label.
COLUMN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ ()-]{0,63}")
#: Names the table already uses for its own bookkeeping (``label`` is allowed: it replaces the
#: folder label).
RESERVED = frozenset({"source", "hash", "base_id", "transform", "param", "status", "reason", "id"})


class MetadataError(PipelineError, ValueError):
    """A metadata file that cannot be read or joined: the message names the file and the value."""


@dataclass
class Metadata:
    """A metadata file read and checked, ready to be joined to the images of a build."""

    source: str
    key: str  # "path" or "file"
    kinds: dict[str, str]  # column -> "str" | "float64", label included when the file has one
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # key value -> {column: value}

    def join(self, images: Sequence[ImageSource]) -> tuple[list[dict[str, Any] | None], int]:
        """Each image's row (None where the file has none) and how many rows matched no image."""
        if self.key == "file":
            names = [os.path.basename(i.uri.rstrip("/")) for i in images]
            seen: dict[str, str] = {}
            for name, image in zip(names, images, strict=True):
                if name in self.rows and name in seen and seen[name] != image.uri:
                    raise MetadataError(
                        f"metadata {self.source!r} is keyed by file name, but {name!r} names two "
                        f"images ({seen[name]} and {image.uri}); key it by 'path' instead")
                seen.setdefault(name, image.uri)
            found = [self.rows.get(n) for n in names]
            matched = set(names) & set(self.rows)
        else:
            found, matched = [], set()
            for image in images:
                for candidate in (image.relative, image.uri, _local(image.uri)):
                    if candidate in self.rows:
                        found.append(self.rows[candidate])
                        matched.add(candidate)
                        break
                else:
                    found.append(None)
        return found, len(set(self.rows) - matched)

    def empty_value(self, column: str) -> Any:
        return np.nan if self.kinds[column] == NUMBER else ""


def _local(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def read_metadata(path: str, storage_options: dict[str, Any] | None = None) -> Metadata:
    """Read and check a CSV or Parquet metadata file (see the module docstring)."""
    import pandas as pd

    text = os.fspath(path)
    ext = os.path.splitext(text.lower())[1]
    if ext not in (".csv", ".parquet", ".pq"):
        raise MetadataError(f"metadata file {text!r}: use a .csv or .parquet file")
    fs, fpath = filesystem(text, storage_options)
    if not fs.isfile(fpath):
        raise MetadataError(f"metadata file {text!r} does not exist")
    try:
        data = fs.cat_file(fpath)
        if ext == ".csv":
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8")
        else:
            try:
                frame = pd.read_parquet(io.BytesIO(data))
            except ImportError:
                raise MetadataError(f"reading {text!r} needs pyarrow: pip install 'hoverlay[export]'") from None
    except MetadataError:
        raise
    except UnicodeDecodeError:
        raise MetadataError(f"metadata file {text!r} is not UTF-8 text") from None
    except Exception as exc:  # pandas' and pyarrow's many parser errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetadataError(f"metadata file {text!r} cannot be read: {reason}") from None
    return _check(frame, text)


def _check(frame: Any, text: str) -> Metadata:
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    keys = [c for c in KEY_COLUMNS if c in columns]
    if not keys:
        raise MetadataError(f"metadata file {text!r} has no key column: name one 'path' (relative to "
                            f"the source folder, or full) or 'file' (the file name); it has "
                            f"{', '.join(map(repr, columns[:8])) or 'no columns'}")
    key_col = keys[0]
    data_cols = [c for c in columns if c not in KEY_COLUMNS]
    if len(data_cols) > MAX_COLUMNS:
        raise MetadataError(f"metadata file {text!r} has {len(data_cols)} columns; at most {MAX_COLUMNS}")
    if len(set(columns)) != len(columns):
        raise MetadataError(f"metadata file {text!r} has a repeated column name")
    for col in data_cols:
        if col in RESERVED:
            raise MetadataError(f"metadata file {text!r}: column {col!r} is one of the table's own "
                                f"({', '.join(sorted(RESERVED))}); rename it")
        if not COLUMN_NAME.fullmatch(col):
            raise MetadataError(f"metadata file {text!r}: column name {col!r} is not allowed (letters, "
                                f"digits, space and _ - ( ), at most 64, not starting with a symbol)")
    keys_raw = frame[key_col]
    key_values = [("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)).strip()
                  for v in keys_raw]
    if any(not k for k in key_values):
        row = key_values.index("") + 2
        raise MetadataError(f"metadata file {text!r}: row {row} has an empty {key_col!r}")
    dupes = pd.Series(key_values)[pd.Series(key_values).duplicated()].tolist()
    if dupes:
        raise MetadataError(f"metadata file {text!r}: {key_col!r} {dupes[0]!r} appears more than once")
    kinds: dict[str, str] = {}
    values: dict[str, list[Any]] = {}
    for col in data_cols:
        kinds[col], values[col] = _column(frame[col], label=col == "label")
    key = "file" if key_col in ("file", "filename") else "path"
    if key == "path":
        key_values = [k if "://" in k else os.path.normpath(k) if not os.path.isabs(k)
                      else os.path.abspath(k) for k in key_values]
    rows = {k: {col: values[col][i] for col in data_cols} for i, k in enumerate(key_values)}
    return Metadata(text, key, kinds, rows)


def _column(series: Any, *, label: bool) -> tuple[str, list[Any]]:
    """(kind, values) of one column: numbers when every non-empty value is one."""
    import pandas as pd

    raw = series.tolist()
    missing = [v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())
               for v in raw]
    if not label and pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return NUMBER, [np.nan if m else float(v) for v, m in zip(raw, missing, strict=True)]
    texts = ["" if m else str(v) for v, m in zip(raw, missing, strict=True)]
    if not label and any(texts):
        numbers = pd.to_numeric(pd.Series([t or None for t in texts], dtype=object), errors="coerce")
        if int(numbers.isna().sum()) == sum(not t for t in texts):
            return NUMBER, [float(x) for x in numbers]
    return TEXT, texts
