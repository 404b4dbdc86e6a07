"""Pages that survive a damaged store: unreadable images become grey, empty tiles.

A store's reader refuses a chunk that is missing or does not decode
(:class:`~hoverlay.stores.CorruptStoreError`) instead of reading zeros as data. For a page of
16 images one damaged image must not take the other 15 down: :class:`TolerantReader` reads the
page as one block and, only when that fails, image by image, filling the images that fail
(mid-grey pixels, zero vectors and norms: similarity 0, no group) and remembering their ids, so
that tiles and top-k cards say "unreadable". The server log names the files; the browser never
sees server paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from hoverlay.stores import CorruptStoreError, StoreReader

log = logging.getLogger(__name__)

#: Grey of an unreadable image's tile: visibly not a photo, and not black (a dark photo).
UNREADABLE_GREY = 128


class TolerantReader:
    """A :class:`StoreReader` (everything else is passed through) whose ``pixels``, ``vectors``
    and ``norms`` fill damaged images instead of raising; ``damaged`` holds their ids."""

    def __init__(self, reader: StoreReader):
        self._reader = reader
        self.damaged: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    @property
    def reader(self) -> StoreReader:
        return self._reader

    def pixels(self, images: Any) -> np.ndarray:
        s = self._reader.image_size
        return self._tolerant(self._reader.pixels, images, (s, s, 3), np.uint8, UNREADABLE_GREY)

    def vectors(self, layer: str, images: Any) -> np.ndarray:
        g = self._reader.geometry(layer)
        return self._tolerant(lambda sel: self._reader.vectors(layer, sel), images,
                              (g.height, g.width, g.dim), np.float16, 0)

    def norms(self, layer: str, images: Any) -> np.ndarray:
        g = self._reader.geometry(layer)
        return self._tolerant(lambda sel: self._reader.norms(layer, sel), images,
                              (g.height, g.width), np.float32, 0)

    def _tolerant(self, read: Callable[[Any], np.ndarray], images: Any, shape: tuple[int, ...],
                  dtype: Any, fill: int) -> np.ndarray:
        try:
            return read(images)
        except CorruptStoreError as exc:
            log.error("damaged store %s: %s", self._reader.url, exc)
        ids, scalar = self._reader.image_ids(images)
        out = np.full((len(ids), *shape), fill, dtype=dtype)
        for k, image in enumerate(ids):
            try:
                out[k] = read(np.array([image]))[0]
            except CorruptStoreError:
                self.damaged.add(int(image))
        return out[0] if scalar else out
