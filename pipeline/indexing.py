"""Build or extend the FAISS index of each layer after a commit, and measure its recall."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from stores import PatchIndex, StoreReader, choose_factory
from stores.format import encode_layer
from stores.index import (
    MAX_RERANK_FACTOR,
    exact_topk,
    nlist_for,
    recall_at_k,
    search_reranked,
)
from stores.rerank import Fetch, rerank_path, vector_fetcher, write_rerank_rows
from stores.search import iter_vector_blocks

log = logging.getLogger(__name__)

TRAIN_POINTS_PER_CENTROID = 64
MAX_TRAIN = 200_000
#: nprobe is chosen on the probe's own queries, so their recall overstates recall on other
#: queries (a selection bias, ~0.01 at 100 queries measured); tuning aims this much higher.
TUNE_MARGIN = 0.01


def _sample_patches(reader: StoreReader, layer: str, n: int, rng: np.random.Generator,
                    exclude: set[int] | None = None, per_image: int | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (ids, float32 vectors) from random ok images, reading whole image chunks.

    ``per_image`` caps the patches taken from one image (recall probes take 1, so 100 queries
    come from 100 images, not from one image's 196 neighbouring patches). Patches in
    ``exclude`` (training points) are never returned; more images are read instead.
    """
    g = reader.geometry(layer)
    hw = g.patches_per_image
    take = min(hw, per_image or hw)
    order = rng.permutation(np.flatnonzero(reader.table().ok))
    excluded = np.fromiter(exclude, dtype=np.int64) if exclude else None
    got_ids: list[np.ndarray] = []
    got_vecs: list[np.ndarray] = []
    have, pos = 0, 0
    while have < n and pos < order.size:
        chosen = np.sort(order[pos:pos + max(1, -(-(n - have) // take))])
        pos += chosen.size
        ids = chosen[:, None] * hw + np.arange(hw)[None, :]  # (images, hw)
        keys = rng.random(ids.shape)  # a random order of each image's patches ...
        if excluded is not None:
            keys[np.isin(ids, excluded)] = np.inf  # ... with training points never picked
        cols = np.argsort(keys, axis=1)[:, :take]
        rows = np.repeat(np.arange(len(chosen)), take)
        keep = np.isfinite(keys[rows, cols.ravel()])
        rows, cols = rows[keep], cols.ravel()[keep]
        vecs = reader.vectors(layer, chosen).reshape(len(chosen), hw, g.dim)
        got_ids.append(ids[rows, cols])
        got_vecs.append(vecs[rows, cols].astype(np.float32))
        have += len(rows)
    if not got_ids:
        return np.empty(0, np.int64), np.empty((0, g.dim), np.float32)
    ids, vecs = np.concatenate(got_ids), np.concatenate(got_vecs)
    if len(ids) > n:
        pick = np.sort(rng.choice(len(ids), size=n, replace=False))
        ids, vecs = ids[pick], vecs[pick]
    return ids, vecs


@dataclass
class RecallProbe:
    """Held-out queries (stored patches, exactly what a hover sends) with their exact top-k."""

    queries: np.ndarray
    truth: np.ndarray
    k: int
    last_latency_ms: float = float("nan")  # p50 of the last recall() run's queries (search + re-rank)

    @classmethod
    def sample(cls, reader: StoreReader, layer: str, k: int, n_queries: int,
               exclude: set[int] | None = None, seed: int = 1) -> RecallProbe:
        rng = np.random.default_rng(seed)
        _, queries = _sample_patches(reader, layer, n_queries, rng, exclude, per_image=1)
        _, truth = exact_topk(queries, iter_vector_blocks(reader, layer), k)
        return cls(queries, truth, k)

    def recall(self, reader: StoreReader, layer: str, index: PatchIndex, fetch: Fetch | None = None) -> float:
        """recall@k of index search + exact re-rank against the exact scan."""
        if len(self.queries) == 0:
            return float("nan")  # nothing held out: unknown, not perfect
        fetch = fetch or vector_fetcher(reader, layer, index.meta)
        found = np.full_like(self.truth, -1)
        took = []
        for i, q in enumerate(self.queries):
            t = time.perf_counter()
            _, ids = search_reranked(index, q, self.k, fetch)
            took.append(time.perf_counter() - t)
            found[i, : len(ids)] = ids
        self.last_latency_ms = float(np.percentile(took, 50) * 1e3)
        return recall_at_k(found, self.truth)


def measure_recall(reader: StoreReader, layer: str, index: PatchIndex, k: int = 10,
                   n_queries: int = 100, exclude: set[int] | None = None, seed: int = 1) -> float:
    """recall@k of index search + exact re-rank vs exact search, on patches held out of training."""
    return RecallProbe.sample(reader, layer, k, n_queries, exclude, seed).recall(reader, layer, index)


def tune_nprobe(reader: StoreReader, layer: str, index: PatchIndex, probe: RecallProbe,
                target_recall: float = 0.95) -> tuple[int, float]:
    """Smallest nprobe whose recall meets the target: doubling from 1, then a binary search.

    Recall grows with nprobe and so does latency, so the smallest sufficient nprobe is also
    the fastest setting that keeps the promised recall. Doubling first keeps the cost of tuning
    near that of the answer: a 10M-vector index has ~12k lists, and probing all of them for
    every held-out query would take minutes. Returns (nprobe, recall at it); nlist when the
    target cannot be met.
    """
    nlist = index.nlist or 1
    fetch = vector_fetcher(reader, layer, index.meta)

    def recall_at(nprobe: int) -> float:
        index.set_params(nprobe=nprobe)
        return probe.recall(reader, layer, index, fetch)

    lo, hi = 0, 1  # invariant once found: recall(lo) < target <= recall(hi)
    r = recall_at(hi)
    while r < target_recall and hi < nlist:
        lo, hi = hi, min(nlist, hi * 2)
        r = recall_at(hi)
    best = (hi, r)
    while hi - lo > 1 and best[1] >= target_recall:
        mid = (lo + hi) // 2
        r = recall_at(mid)
        if r >= target_recall:
            best, hi = (mid, r), mid
        else:
            lo = mid
    index.set_params(nprobe=best[0])
    return best


#: Without ``--index-memory``, an index may take this share of the machine's RAM. The explorer
#: maps indexes (page cache, shared by its processes), but a build holds the one it is writing.
DEFAULT_BUDGET_SHARE = 0.4


def default_index_budget() -> int:
    """Bytes an index may use when no budget is given: 40% of physical memory."""
    import psutil

    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_SHARE)


def tune_search(reader: StoreReader, layer: str, index: PatchIndex, probe: RecallProbe,
                target_recall: float) -> dict[str, Any]:
    """nprobe (IVF) and, when even probing every list misses the target, more re-rank candidates
    (compressed codes: ``rerank_factor`` doubled up to MAX_RERANK_FACTOR, nprobe re-tuned each time).

    Returns what was chosen: ``{"nprobe", "rerank_factor", "recall"}``.
    """
    while True:
        if index.nlist and index.nlist > 1:
            nprobe, recall = tune_nprobe(reader, layer, index, probe, target_recall)
        else:
            nprobe, recall = None, probe.recall(reader, layer, index)
        done = recall >= target_recall or np.isnan(recall)  # nan: no held-out queries to tune on
        if done or index.stores_exact_vectors or index.rerank_factor >= MAX_RERANK_FACTOR:
            return {"nprobe": nprobe, "rerank_factor": index.rerank_factor, "recall": recall}
        index.meta["rerank_factor"] = index.rerank_factor * 2


def update_index(reader: StoreReader, layer: str, memory_budget: int | None = None,
                 rebuild: bool = False, k: int = 10, n_queries: int = 100,
                 factory: str | None = None, seed: int = 0, tune: bool = True,
                 target_recall: float = 0.95, device: str = "cpu") -> dict[str, Any]:
    """Extend the layer's index with images committed since it was saved (no retraining),
    or build one (choosing the factory by size) when there is none or ``rebuild`` is set.

    ``memory_budget`` bytes bound the index (None: :func:`default_index_budget`); the factory
    is the most exact one that fits (:func:`stores.choose_factory`). For IVF indexes ``nprobe``
    is tuned (``tune``) to the smallest value reaching ``target_recall`` on held-out queries,
    and both are recorded in ``index/<layer>.json``. ``device`` "cuda…" trains IVF k-means on
    the GPUs when FAISS has GPU support (faiss-gpu), else on the CPU (``meta["trained_on"]``)."""
    t0 = time.perf_counter()
    g = reader.geometry(layer)
    index: PatchIndex | None = None
    if not rebuild:
        try:
            index = PatchIndex.load(reader.url, layer)
        except FileNotFoundError:
            index = None
        except Exception as exc:  # stale or corrupt: rebuild rather than extend garbage
            log.warning("rebuilding index for %s: %s", layer, exc)
            index = None
        if index is not None and int(index.meta.get("images_indexed", 0)) > reader.n_images:
            index = None  # the store was rebuilt smaller: the index describes other data
    rng = np.random.default_rng(seed)
    train_ids: set[int] = set()
    created = index is None
    if index is None:
        n_vectors = int(reader.table().ok.sum()) * g.patches_per_image
        budget = memory_budget if memory_budget is not None else default_index_budget()
        chosen = factory or choose_factory(n_vectors, g.dim, budget)
        index = PatchIndex.create(g.dim, chosen)
        index.meta["memory_budget"] = budget
        if not index.is_trained:
            nlist = nlist_for(n_vectors)
            # at most half of the vectors, so the recall probe has patches training never saw
            n_train = min(MAX_TRAIN, nlist * TRAIN_POINTS_PER_CENTROID, max(1, n_vectors // 2))
            ids, sample = _sample_patches(reader, layer, n_train, rng)
            index.train(sample, use_gpu=device.startswith("cuda"))  # FAISS GPU k-means if installed
            train_ids = set(ids.tolist())
        index.meta["images_indexed"] = 0
        index.meta["built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    start = int(index.meta["images_indexed"])
    added = 0
    for ids, vecs in iter_vector_blocks(reader, layer, images_per_block=max(reader.attrs.chunk, 256),
                                        start=start):
        index.add(vecs, ids)
        added += len(ids)
    index.meta["images_indexed"] = reader.n_images
    index.meta["nlist"] = index.nlist
    if not index.stores_exact_vectors and rerank_path(reader.url, layer) is not None:
        # compressed codes: keep the exact fp16 vectors beside them for a fast re-rank
        valid = int((index.meta.get("rerank") or {}).get("rows", 0)) if start else 0
        index.meta["rerank"] = {"rows": write_rerank_rows(reader, layer, valid), "dtype": "float16",
                                "file": f"{encode_layer(layer)}.f16"}
    needs_recall = added > 0 or "recall" not in index.meta
    if needs_recall:
        exact = index.meta["factory"] == "IDMap,Flat"
        probe = RecallProbe.sample(reader, layer, k, n_queries, exclude=train_ids, seed=seed + 1)
        if tune and not (index.stores_exact_vectors and not index.nlist):
            index.meta["tuned"] = {**tune_search(reader, layer, index, probe, target_recall + TUNE_MARGIN),
                                   "target_recall": target_recall, "margin": TUNE_MARGIN}
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # the explorer's setting (stores.search.LayerSearch)
        try:
            recall = probe.recall(reader, layer, index)
        finally:
            faiss.omp_set_num_threads(threads)
        index.meta["recall"] = {"k": k, "value": recall, "queries": len(probe.queries), "exact_index": exact,
                                "p50_ms": round(probe.last_latency_ms, 3),
                                "measured": "index search + exact re-rank vs exact scan; p50_ms: one "
                                            "query at a time on one thread, at this build"}
    if created or needs_recall or start != reader.n_images:  # else nothing changed: files untouched
        index.meta["build_seconds"] = round(time.perf_counter() - t0, 3)
        index.save(reader.url, layer)
    return dict(index.meta, ntotal=index.ntotal, added=added)
