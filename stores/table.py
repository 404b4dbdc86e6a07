"""The per-image table: one Zarr array per column under ``images/table``.

Columns (not rows) because every consumer wants one or two columns for many images
(hashes for deduplication, labels for filtering) and Zarr appends columns cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .format import STATUS_OK, TABLE_COLUMNS

_DEFAULTS: dict[str, Any] = {
    "source": "", "label": "", "hash": "", "base_id": -1, "transform": "none",
    "param": 0.0, "status": STATUS_OK, "reason": "",
}


def column_dtype(column: str) -> Any:
    kind = TABLE_COLUMNS[column]
    return str if kind == "str" else np.dtype(kind)


def fill_value(column: str) -> Any:
    return _DEFAULTS[column]


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
        out[col] = np.array(values, dtype=object if kind == "str" else kind)
        if kind == "str":
            out[col] = out[col].astype(str)
    return out


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
