"""The hover path's server work, without any UI: page blocks, query vectors, memoised maps.

One :class:`OverlayEngine` per browser session. It keeps the current page's patches as float32
matrices (built once per page change) so that a hover costs one matmul per shown layer, and it
memoises finished maps per (page, query, function) so hovering back over a patch is free.
Everything here is plain numpy on a :class:`stores.StoreReader`: the benchmark times exactly
this object, and the app only copies its results into Bokeh sources.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hoverlay.stores import OutOfRangeError, StoreReader

from .kernels import PageBlock, QueryVector, map_patch, page_block, page_similarity


@dataclass(frozen=True)
class Query:
    """A patch (y, x) of image ``image`` in layer ``layer``: what the user hovers or pins."""

    image: int
    y: int
    x: int
    layer: str

    def as_text(self) -> str:
        """The URL form ``image,y,x`` (the layer travels in its own URL parameter)."""
        return f"{self.image},{self.y},{self.x}"


def parse_query_text(text: str) -> tuple[int, int, int]:
    """Parse ``"image,y,x"`` into integers; ValueError naming the text otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3:
        raise ValueError(f"query {text!r} is not 'image,y,x'")
    try:
        image, y, x = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"query {text!r} is not 'image,y,x' with integers") from None
    return image, y, x


class _LRU:
    """A tiny least-recently-used memo: hovering back and forth revisits the same few keys."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


class OverlayEngine:
    """Similarity maps for one page of images and a set of shown layers."""

    def __init__(self, reader: StoreReader, layers: Sequence[str], memo_size: int = 64,
                 external: Mapping[int, Mapping[str, PageBlock]] | None = None):
        """``external``: images that are not in the store (uploads), by a negative id, each with
        its layers' blocks; shared by reference, so an image added to it is seen at once. Ids
        are never reused (the memo is keyed by them)."""
        self.reader = reader
        self.external: Mapping[int, Mapping[str, PageBlock]] = external if external is not None else {}
        self._layers: list[str] = []
        self._page = np.empty(0, dtype=np.int64)
        self._page_generation = 0
        self._blocks: dict[str, PageBlock] = {}
        self._image_blocks = _LRU(4 * max(1, len(layers)) + 8)
        self._memo = _LRU(memo_size)
        self.set_layers(layers)

    # ----------------------------------------------------------------------- state
    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    @property
    def page_ids(self) -> np.ndarray:
        return self._page.copy()

    def set_layers(self, layers: Sequence[str]) -> None:
        for layer in layers:
            self.reader.geometry(layer)  # UnknownLayerError names the layer
        if list(layers) != self._layers:
            self._layers = list(layers)
            self._blocks = {}
            self._page_generation += 1

    def set_page(self, image_ids: Sequence[int] | np.ndarray) -> None:
        """Show these images; their patches are read lazily, once, on the next computation."""
        ids = np.asarray(image_ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.reader.n_images):
            bad = ids[(ids < 0) | (ids >= self.reader.n_images)][0]
            raise OutOfRangeError(f"image id {int(bad)} is outside the {self.reader.n_images} "
                                  f"committed images")
        if not np.array_equal(ids, self._page):
            self._page = ids
            self._blocks = {}
            self._page_generation += 1

    def block(self, layer: str) -> PageBlock:
        """The page's patches of one layer as a float32 matrix, read on first use."""
        blk = self._blocks.get(layer)
        if blk is None:
            g = self.reader.geometry(layer)
            if self._page.size:
                blk = page_block(self.reader.vectors(layer, self._page),
                                 self.reader.norms(layer, self._page))
            else:
                blk = page_block(np.zeros((0, g.height, g.width, g.dim), np.float16))
            self._blocks[layer] = blk
        return blk

    def image_block(self, image: int, layer: str) -> PageBlock:
        """One image's patches of one layer (for queries and the layer view), memoised."""
        blk = self._block_at_hand(image, layer)
        if blk is None:
            ids = np.array([int(image)])
            blk = page_block(self.reader.vectors(layer, ids), self.reader.norms(layer, ids))
            self._image_blocks.put((int(image), layer), blk)
        return blk

    def _block_at_hand(self, image: int, layer: str) -> PageBlock | None:
        """The image's block without reading: an upload's, a memoised one, or a slice of the
        page's block (memoised); None when it would have to be read and converted."""
        if int(image) in self.external:
            return self.external[int(image)][layer]
        key = (int(image), layer)
        blk = self._image_blocks.get(key)
        if blk is None:
            hit = np.flatnonzero(self._page == image)
            if not (hit.size and layer in self._blocks):
                return None
            full = self._blocks[layer]
            n, h, w = full.shape
            lo = int(hit[0]) * h * w
            blk = PageBlock(full.vectors[lo:lo + h * w], full.norms[lo:lo + h * w], (1, h, w))
            self._image_blocks.put(key, blk)
        return blk

    # --------------------------------------------------------------------- queries
    def validate(self, query: Query) -> Query:
        """Raise :class:`stores.OutOfRangeError` / :class:`stores.UnknownLayerError` for a bad query."""
        if query.image in self.external:
            g = self.reader.geometry(query.layer)
            if not (0 <= query.y < g.height and 0 <= query.x < g.width):
                raise OutOfRangeError(f"patch ({query.y},{query.x}) is outside the {g.height}×{g.width} "
                                      f"grid of {query.layer}")
            return query
        self.reader.patch_id(query.layer, query.image, query.y, query.x)
        return query

    def mapped(self, query: Query, layer: str) -> tuple[int, int]:
        """The query's cell in another layer (receptive-field centre mapping)."""
        src, dst = self.reader.geometry(query.layer), self.reader.geometry(layer)
        y, x = map_patch(query.y, query.x, (src.height, src.width), (dst.height, dst.width))
        return int(y), int(x)

    def query_vectors(self, query: Query, layers: Sequence[str] | None = None) -> dict[str, QueryVector]:
        """The query patch's vector in each layer, at the cell mapped into that layer."""
        out = {}
        for layer in layers or self._layers:
            y, x = self.mapped(query, layer)
            out[layer] = self._patch_vector(query.image, y, x, layer)
        return out

    def _patch_vector(self, image: int, y: int, x: int, layer: str) -> QueryVector:
        """One patch's vector: from a block already made when there is one, else from the
        reader's (cached) row — not by making the whole image's float32 block, which every rest
        would otherwise pay for a patch's 1/(H·W) of it."""
        blk = self._block_at_hand(image, layer)
        if blk is not None:
            row = y * blk.shape[2] + x
            return QueryVector(blk.vectors[row], float(blk.norms[row]))
        ids = np.array([int(image)])
        unit = np.asarray(self.reader.vectors(layer, ids)[0, y, x], dtype=np.float32)
        return QueryVector(unit, float(self.reader.norms(layer, ids)[0, y, x]))

    def page_maps(self, query: Query, function: str = "cosine",
                  sigmas: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
        """``{layer: (n, H, W) float32}`` similarity of the query to every patch of the page."""
        key = ("page", self._page_generation, query, function, _frozen(sigmas))
        maps = self._memo.get(key)
        if maps is None:
            blocks = {layer: self.block(layer) for layer in self._layers}
            maps = page_similarity(self.query_vectors(query), blocks, function, sigmas)
            self._memo.put(key, maps)
        return maps

    def image_maps(self, image: int, query: Query, function: str = "cosine",
                   sigmas: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
        """``{layer: (1, H, W)}`` similarity of the query to one image (the layer view)."""
        key = ("image", tuple(self._layers), int(image), query, function, _frozen(sigmas))
        maps = self._memo.get(key)
        if maps is None:
            blocks = {layer: self.image_block(image, layer) for layer in self._layers}
            maps = page_similarity(self.query_vectors(query), blocks, function, sigmas)
            self._memo.put(key, maps)
        return maps


def _frozen(mapping: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((mapping or {}).items()))
