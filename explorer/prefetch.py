"""The next page read ahead: a page switch should not wait for the store.

Reading a page (16 images: pixels plus three layers' vectors and norms) costs ~0.3 s of Zarr
reads on a 2-core machine, most of a page switch's server time. After a page is shown its
successor is read in one worker thread; a switch to it takes the result (waiting for a read
already under way rather than starting a second one). A read that fails is forgotten: the
switch then reads again in the session and shows that error as any read does, so a damaged
chunk is never silently skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from hoverlay.stores import StoreReader

from .sparse_fp16 import PackedLayer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PageData:
    """A page's pixels and, for the browser path, each layer's vectors and norms packed as the
    browser receives them (packed here, in the worker thread, not on the session's loop)."""

    pixels: np.ndarray
    vectors: dict[str, PackedLayer]


def read_vectors(reader: StoreReader, ids: np.ndarray, layers: Sequence[str]) -> dict[str, PackedLayer]:
    """Each layer's vectors and norms of images ``ids``, packed as the browser receives them."""
    return {name: PackedLayer.of(reader.vectors(name, ids), reader.norms(name, ids)) for name in layers}


def read_page(reader: StoreReader, ids: np.ndarray, layers: Sequence[str]) -> PageData:
    return PageData(reader.pixels(ids), read_vectors(reader, ids, layers))


class PagePrefetch:
    """At most a couple of pages read ahead for one session."""

    def __init__(self, executor: Callable[[], Executor], keep: int = 2):
        self._executor = executor
        self._keep = keep
        self._futures: dict[tuple, Future] = {}

    @staticmethod
    def _key(reader: StoreReader, ids: np.ndarray, layers: Sequence[str]) -> tuple:
        return id(reader), reader.n_images, tuple(int(i) for i in ids), tuple(layers)

    def request(self, reader: StoreReader, ids: np.ndarray, layers: Sequence[str]) -> Future[PageData] | None:
        """Start reading a page (nothing for an empty page; a page already requested is not read
        twice); the read's future (None for an empty page)."""
        if not len(ids):
            return None
        key = self._key(reader, ids, layers)
        if key in self._futures:
            return self._futures[key]
        while len(self._futures) >= self._keep:
            self._futures.pop(next(iter(self._futures))).cancel()
        future = self._futures[key] = self._executor().submit(read_page, reader, np.asarray(ids), list(layers))
        return future

    def take(self, reader: StoreReader, ids: np.ndarray, layers: Sequence[str]) -> PageData | None:
        """The page if it was requested (waiting for a read under way), else None."""
        future = self._futures.pop(self._key(reader, ids, layers), None)
        if future is None or future.cancelled():
            return None
        try:
            return future.result()
        except Exception as exc:  # read again in the session, which reports it
            log.info("read-ahead of a page failed (%s); reading it again", exc)
            return None

    def clear(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
