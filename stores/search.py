"""Top-k patch search over a whole store: FAISS when a fresh index exists, exact otherwise.

This is what the explorer calls per query. It owns the policy "never show an approximate
score": FAISS candidates are always re-ranked from the stored vectors (the layer's re-rank
file when there is one, see :mod:`stores.rerank`), and a missing or stale
index degrades to an exact streaming scan with a warning instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import StoreError
from .index import PatchIndex, exact_topk, merge_topk, search_reranked
from .reader import StoreReader
from .rerank import vector_fetcher

log = logging.getLogger(__name__)


@dataclass
class TopK:
    scores: np.ndarray   # float32 (k,), exact cosines, descending
    ids: np.ndarray      # int64 (k,), global patch ids
    exact: bool          # True when computed by a full scan rather than through an index
    scanned_newer: bool = False  # index for older images + exact scan of images it lacks

    @property
    def method(self) -> str:
        """How the hits were found, in words (the explorer shows it)."""
        if self.exact:
            return "exact scan"
        return "index + exact scan of the newer images" if self.scanned_newer else "index + exact re-rank"


def iter_vector_blocks(reader: StoreReader, layer: str, images_per_block: int | None = None,
                       ok_only: bool = True, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (patch ids, float16 vectors (b, D)) for committed images from ``start`` on,
    a block of whole shards at a time (failed images, whose vectors are zeros, left out)."""
    g = reader.geometry(layer)
    step = images_per_block or max(reader.attrs.chunk, 1)
    ok = reader.table().ok if ok_only else None
    hw = g.patches_per_image
    for lo in range(start, reader.n_images, step):
        hi = min(reader.n_images, lo + step)
        vecs = reader.vectors(layer, slice(lo, hi)).reshape(-1, g.dim)
        ids = np.arange(lo * hw, hi * hw, dtype=np.int64)
        if ok is not None and not ok[lo:hi].all():
            keep = np.repeat(ok[lo:hi], hw)
            vecs, ids = vecs[keep], ids[keep]
        yield ids, vecs


class LayerSearch:
    """Search one layer of one store; construct once per process and share between sessions."""

    def __init__(self, reader: StoreReader, layer: str, mmap: bool = True, query_threads: int | None = 1):
        """``query_threads`` sets FAISS's OpenMP threads *for the process* (None leaves them).

        One query at a time is the explorer's workload; OpenMP's fork/join and spin-waits cost
        more than they save there: a flat top-32 over 100k x 112 took 4.4 ms p50 on one thread
        vs 34 ms on two on a busy 2-core machine (measured). Sessions run concurrently on
        server threads instead.
        """
        if query_threads is not None:
            import faiss

            faiss.omp_set_num_threads(query_threads)
        self.reader = reader
        self.layer = layer
        self.index: PatchIndex | None = None
        self.warning: str | None = None
        reader.geometry(layer)  # unknown layer -> clear error now, not per query
        #: images from here on are not in the index: searched by an exact scan and merged
        self.scan_from = 0
        try:
            index = PatchIndex.load(reader.url, layer, mmap=mmap, storage_options=reader.storage_options)
        except FileNotFoundError:
            self.warning = f"no index for layer {layer!r}: using exact search"
        except (StoreError, RuntimeError) as exc:
            self.warning = f"index for layer {layer!r} unusable ({exc}): using exact search"
        else:
            indexed = index.meta.images_indexed
            if 0 < indexed < reader.n_images:
                # a build committed images and has not extended the index yet (or failed to):
                # the index answers for what it covers, an exact scan for the rest
                self.index, self.scan_from = index, indexed
                self.warning = (f"index for layer {layer!r} covers {indexed} of {reader.n_images} "
                                f"images (stale): the {reader.n_images - indexed} newer ones are "
                                f"searched exactly")
            elif indexed != reader.n_images:
                self.warning = (f"index for layer {layer!r} covers {indexed} of {reader.n_images} "
                                f"images (stale): using exact search")
            else:
                self.index = index
        self._fetch = vector_fetcher(reader, layer, self.index.meta if self.index is not None else None)
        if self.warning:
            log.warning(self.warning)

    def query_vector(self, image: int, y: int, x: int) -> np.ndarray:
        return self.reader.patch_vectors(self.layer, np.array([self.reader.patch_id(self.layer, image, y, x)]))[0]

    def search(self, query: np.ndarray, k: int) -> TopK:
        """Top-k patches for a unit query vector, exact scores; ``exact`` when no index was used."""
        q = np.asarray(query, dtype=np.float32).ravel()
        if self.index is None:
            s, i = exact_topk(q, iter_vector_blocks(self.reader, self.layer), k)
            keep = i[0] >= 0
            return TopK(s[0][keep], i[0][keep], exact=True)
        scores, ids = search_reranked(self.index, q, k, self._fetch)
        if self.scan_from:
            s, i = exact_topk(q, iter_vector_blocks(self.reader, self.layer, start=self.scan_from), k)
            keep = i[0] >= 0
            scores, ids = merge_topk(scores, ids, s[0][keep], i[0][keep], k)
        return TopK(scores, ids, exact=False, scanned_newer=bool(self.scan_from))
