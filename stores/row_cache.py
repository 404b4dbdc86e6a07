"""A byte-bounded LRU of decoded image rows, shared by the threads of one process.

Why: a server's sessions read the same few images again and again. On the explorer's browser
path one pointer rest reads the query image's vectors and norms in every shown layer three times
(the query sent to the page, the layer view, the top-k query), its pixels for the layer view and
eight hits' pixels for the crops; each is a Zarr read that decompresses a whole image row
(~0.8 MB for the default model's three layers). The same images were read moments before, to
send the page. Committed rows never change in place (a commit only appends; the reader drops the
cache when a refresh sees a new commit), so a decoded row can be kept as it is.

Rows are kept read-only, so a caller that writes into one fails loudly instead of changing what
every other reader sees. Keys are ``(array path, image id)``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class RowCache:
    """Decoded rows ``(path, image) -> ndarray`` within ``max_bytes``, least recently used out."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"a row cache of {max_bytes} bytes")
        self.max_bytes = int(max_bytes)
        self._rows: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, path: str, image: int) -> np.ndarray | None:
        key = (path, int(image))
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                self.misses += 1
                return None
            self._rows.move_to_end(key)
            self.hits += 1
            return row

    def put(self, path: str, image: int, row: np.ndarray) -> np.ndarray:
        """Keep a copy of ``row`` (never a view into a larger read) and return it, read-only."""
        kept = np.array(row, copy=True)
        kept.flags.writeable = False
        if kept.nbytes > self.max_bytes:
            return kept
        key = (path, int(image))
        with self._lock:
            old = self._rows.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._rows[key] = kept
            self.nbytes += kept.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._rows.popitem(last=False)
                self.nbytes -= dropped.nbytes
        return kept

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"RowCache({len(self)} rows, {self.nbytes / 2**20:.1f} of {self.max_bytes / 2**20:.0f} MiB, "
                f"{self.hits} hits, {self.misses} misses)")
