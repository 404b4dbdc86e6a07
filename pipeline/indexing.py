"""Build or extend the FAISS index of each layer after a commit, and measure its recall."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from hoverlay.stores import PatchIndex, StoreReader
from hoverlay.stores.errors import StoreError
from hoverlay.stores.format import encode_layer
from hoverlay.stores.index import (
    EXACT_CODES,
    MAX_EF_SEARCH,
    MAX_RERANK_FACTOR,
    RERANK_BYTES_PER_VALUE,
    IndexChoice,
    StreamingTopK,
    check_index_budget,
    choose_index,
    codes_of,
    estimate_index_bytes,
    exact_scores,
    exact_topk,
    nlist_for,
    read_index_meta,
    recall_per_query,
    search_reranked,
)
from hoverlay.stores.index_meta import (
    ChoiceRecord,
    IndexMeta,
    RecallRecord,
    RerankRecord,
    TuneRecord,
)
from hoverlay.stores.rerank import Fetch, RerankAppender, rerank_path, vector_fetcher
from hoverlay.stores.search import iter_vector_blocks

from .progress import SILENT, ProgressReporter

log = logging.getLogger(__name__)

TRAIN_POINTS_PER_CENTROID = 64
#: Training points: at most this many, and at most MAX_TRAIN_BYTES of float32. Two-level
#: k-means (stores.kmeans) makes FAISS's 39-per-list minimum affordable at 12k lists.
MAX_TRAIN = 1_000_000
MAX_TRAIN_BYTES = 2 << 30
#: Recall is tuned on a sample of queries, and a sample's mean overstates the recall of other
#: queries about half the time: at 10M x 512, 100 probe queries said 0.962 where 100 others
#: measured 0.935. Tuning therefore requires the one-sided 95% lower confidence bound
#: (mean - TUNE_Z standard errors of the per-query recalls) to reach the target.
TUNE_Z = 1.645
DEFAULT_PROBE_QUERIES = 200
#: An update that adds more than this share of a graph's vectors rebuilds the graph instead:
#: one large batch appended to an HNSW graph links poorly (see add_new_vectors).
GRAPH_APPEND_SHARE = 0.25


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
    last_per_query: np.ndarray = field(default_factory=lambda: np.empty(0))  # recall of each query, last run
    _kth: np.ndarray | None = field(default=None, repr=False)  # float64 k-th true score per query
    _rows: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # stored vectors read so far

    @classmethod
    def sample(cls, reader: StoreReader, layer: str, k: int, n_queries: int,
               exclude: set[int] | None = None, seed: int = 1) -> RecallProbe:
        """Draw queries and find their exact top-k with a scan of the whole layer."""
        queries = cls.draw(reader, layer, n_queries, exclude, seed)
        _, truth = exact_topk(queries, iter_vector_blocks(reader, layer), k)
        return cls(queries, truth, k)

    @staticmethod
    def draw(reader: StoreReader, layer: str, n_queries: int, exclude: set[int] | None = None,
             seed: int = 1) -> np.ndarray:
        """float32 query vectors: one stored patch from each of ``n_queries`` random images."""
        _, queries = _sample_patches(reader, layer, n_queries, np.random.default_rng(seed), exclude, per_image=1)
        return queries

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
        self.last_per_query = self.tie_aware_recall(found, fetch)
        return float(self.last_per_query.mean())

    def tie_aware_recall(self, found: np.ndarray, fetch: Fetch) -> np.ndarray:
        """Per-query recall of ``found`` against the truth, a found id scoring the k-th true
        score counting as a hit (:func:`stores.index.recall_per_query`). Scores are float64
        from the stored vectors, read only for found ids outside the true list (the k-th true
        scores once per probe), so a probe re-ranking from Zarr stays cheap."""
        cached = self.cached(fetch)
        if self._kth is None:
            cached(self.truth[self.truth >= 0])  # one batched read (a chunk per image from Zarr)
            scores = exact_scores(self.queries, self.truth, cached)
            self._kth = np.where(np.isinf(scores), np.inf, scores).min(axis=1)
        others = np.array([[i >= 0 and i not in set(t.tolist()) for i in f.tolist()]
                           for f, t in zip(found, self.truth, strict=True)]).reshape(found.shape)
        outside = np.where(others, found, -1)
        cached(outside[outside >= 0])  # one batched read for every query's outsiders
        scores = exact_scores(self.queries, outside, cached)
        return recall_per_query(found, self.truth, scores, self._kth)

    def cached(self, fetch: Fetch) -> Fetch:
        """``fetch`` through a per-probe cache of rows: tuning re-scores mostly the same ids at
        each setting, and a read from Zarr costs a chunk per image. Stored vectors never change,
        so a cached row is always right; only latency is not measured through it."""
        rows = self._rows

        def cached(ids: np.ndarray) -> np.ndarray:
            ids = np.asarray(ids, dtype=np.int64)
            missing = np.unique(ids[[int(i) not in rows for i in ids.tolist()]]) if ids.size else ids
            if missing.size:
                for i, v in zip(missing.tolist(), np.asarray(fetch(missing)), strict=True):
                    rows[i] = v
            if not ids.size:
                return np.empty((0, self.queries.shape[1]), np.float16)
            return np.stack([rows[int(i)] for i in ids.tolist()])

        return cached

    def lower_bound(self, z: float = TUNE_Z) -> float:
        """One-sided lower confidence bound on the last run's mean recall (z standard errors)."""
        r = self.last_per_query
        if r.size < 2:
            return float(r.mean()) if r.size else float("nan")
        return float(r.mean() - z * r.std(ddof=1) / np.sqrt(r.size))


def measure_recall(reader: StoreReader, layer: str, index: PatchIndex, k: int = 10,
                   n_queries: int = DEFAULT_PROBE_QUERIES, exclude: set[int] | None = None, seed: int = 1) -> float:
    """recall@k of index search + exact re-rank vs exact search, on patches held out of training."""
    return RecallProbe.sample(reader, layer, k, n_queries, exclude, seed).recall(reader, layer, index)


def tune_param(reader: StoreReader, layer: str, index: PatchIndex, probe: RecallProbe, name: str,
               maximum: int, target_recall: float = 0.95,
               on_step: Callable[[int], None] | None = None) -> tuple[int, float, float]:
    """Smallest value of the search parameter ``name`` (``nprobe``, ``efSearch``) whose recall
    meets the target (its lower confidence bound on the probe, :meth:`RecallProbe.lower_bound`):
    doubling from 1, then a binary search.

    Recall grows with nprobe (efSearch) and so does latency, so the smallest sufficient value
    is also the fastest setting that keeps the promised recall. Doubling first keeps the cost
    of tuning near that of the answer: a 10M-vector index has ~12k lists, and probing all of
    them for every held-out query would take minutes. Returns (value, mean recall, its lower
    bound); the value is ``maximum`` when the target cannot be met.
    """
    fetch = probe.cached(vector_fetcher(reader, layer, index.meta))  # recall only: latency is not read here
    means: dict[int, float] = {}

    def recall_at(value: int) -> float:
        index.set_params(**{name: value})
        means[value] = probe.recall(reader, layer, index, fetch)
        if on_step is not None:
            on_step(1)
        return probe.lower_bound()

    lo, hi = 0, 1  # invariant once found: recall(lo) < target <= recall(hi)
    r = recall_at(hi)
    while r < target_recall and hi < maximum:
        lo, hi = hi, min(maximum, hi * 2)
        r = recall_at(hi)
    best = (hi, r)
    while hi - lo > 1 and best[1] >= target_recall:
        mid = (lo + hi) // 2
        r = recall_at(mid)
        if r >= target_recall:
            best, hi = (mid, r), mid
        else:
            lo = mid
    index.set_params(**{name: best[0]})
    return best[0], means[best[0]], best[1]


def tune_nprobe(reader: StoreReader, layer: str, index: PatchIndex, probe: RecallProbe,
                target_recall: float = 0.95,
                on_step: Callable[[int], None] | None = None) -> tuple[int, float, float]:
    """Smallest nprobe whose recall's lower bound meets the target (:func:`tune_param`)."""
    return tune_param(reader, layer, index, probe, "nprobe", index.nlist or 1, target_recall, on_step)


def tune_ef_search(reader: StoreReader, layer: str, index: PatchIndex, probe: RecallProbe,
                   target_recall: float = 0.95,
                   on_step: Callable[[int], None] | None = None) -> tuple[int, float, float]:
    """Smallest HNSW efSearch whose recall's lower bound meets the target (:func:`tune_param`):
    the graph's beam, which is to HNSW what nprobe is to IVF (wider: slower, better recall)."""
    return tune_param(reader, layer, index, probe, "efSearch", MAX_EF_SEARCH, target_recall, on_step)


#: Without ``--index-memory``, an index may take this share of the machine's RAM. The explorer
#: maps indexes (page cache, shared by its processes), but a build holds the one it is writing.
DEFAULT_BUDGET_SHARE = 0.4


def default_index_budget() -> int:
    """Bytes an index may use when no budget is given: 40% of physical memory."""
    import psutil

    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_SHARE)


def tune_search(reader: StoreReader, layer: str, index: PatchIndex, probe: RecallProbe,
                target_recall: float, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """nprobe (IVF) and, when even probing every list misses the target, more re-rank candidates
    (compressed codes: ``rerank_factor`` doubled up to MAX_RERANK_FACTOR, nprobe re-tuned each time).

    HNSW graphs tune ``efSearch`` the same way. Returns what was chosen: ``{"nprobe",
    "ef_search", "rerank_factor", "recall", "lower_bound"}``; the target applies to the lower
    bound (:meth:`RecallProbe.lower_bound`).
    """
    while True:
        nprobe: int | None = None
        ef_search: int | None = None
        if index.is_graph:
            ef_search, recall, bound = tune_ef_search(reader, layer, index, probe, target_recall, on_step)
        elif index.nlist and index.nlist > 1:
            nprobe, recall, bound = tune_nprobe(reader, layer, index, probe, target_recall, on_step)
        else:
            recall = probe.recall(reader, layer, index)
            bound = probe.lower_bound()
        done = bound >= target_recall or np.isnan(recall)  # nan: no held-out queries to tune on
        if done or index.stores_exact_vectors or index.rerank_factor >= MAX_RERANK_FACTOR:
            return {"nprobe": nprobe, "ef_search": ef_search, "rerank_factor": index.rerank_factor,
                    "recall": recall, "lower_bound": bound}
        index.meta.rerank_factor = index.rerank_factor * 2


def _reusable_rerank_rows(reader: StoreReader, layer: str) -> int:
    """Rows of the existing re-rank file a rebuilt index may keep: those the previous index's
    .json vouched for, if it describes this very store (``created`` names a store instance;
    a store recreated at the same path has another). Committed vectors never change, so
    rebuilding a 10M x 512 index need not rewrite its 10 GB of fp16 rows."""
    try:
        previous = read_index_meta(reader.url, layer, reader.storage_options)
    except (OSError, ValueError, StoreError):
        return 0
    if previous is None or previous.rerank is None:
        return 0
    rows = previous.rerank.rows
    hw = reader.geometry(layer).patches_per_image
    same_store = bool(reader.attrs.created) and previous.rerank.store_created == reader.attrs.created
    if not same_store or rows % hw or rows > reader.n_images * hw:
        return 0
    return rows


@dataclass(frozen=True)
class IndexUpdate:
    """What :func:`update_index` left in ``index/<layer>.json``, and how many vectors it added."""

    meta: IndexMeta
    added: int


def update_index(reader: StoreReader, layer: str, memory_budget: int | None = None,
                 rebuild: bool = False, k: int = 10, n_queries: int = DEFAULT_PROBE_QUERIES,
                 factory: str | None = None, seed: int = 0, tune: bool = True,
                 target_recall: float = 0.95, device: str = "cpu",
                 progress: ProgressReporter = SILENT) -> IndexUpdate:
    """Extend the layer's index with images committed since it was saved (no retraining),
    or build one (choosing the factory by size) when there is none or ``rebuild`` is set.

    ``memory_budget`` bytes bound the index (None: :func:`default_index_budget`); the factory
    is the most exact one that fits (:func:`stores.choose_factory`), and a budget below the
    smallest index for the layer's size raises :class:`~hoverlay.stores.index.IndexBudgetError`
    before anything is read or written (``hoverlay build`` runs the same check before its first
    write: :func:`stores.index.check_index_budget`). For IVF indexes ``nprobe``
    is tuned (``tune``) to the smallest value whose recall on ``n_queries`` held-out queries
    reaches ``target_recall`` with 95% confidence (:meth:`RecallProbe.lower_bound`), and both
    are recorded in ``index/<layer>.json``. The store is read once for adding, the re-rank file
    and the probe's exact top-k; a rebuild keeps re-rank rows read from this same store.
    ``device`` "cuda…" trains IVF k-means on the GPUs when FAISS has GPU support (faiss-gpu),
    else on the CPU (``meta.trained_on``). Returns the saved metadata and how many vectors were added.

    The steps: :func:`load_extendable_index` or :func:`create_trained_index`, then
    :func:`add_new_vectors`, :func:`measure_and_tune` and the save; each reports to ``progress``.
    """
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    if factory is None:  # the build's own check before its first write, on the committed numbers
        check_index_budget(memory_budget, {layer: layer_index_size(reader, layer)})
    index = None if rebuild else load_extendable_index(reader, layer, memory_budget)
    created = index is None
    train_ids: set[int] = set()
    reusable_rerank_rows = _reusable_rerank_rows(reader, layer) if created else 0
    if index is None:
        index, train_ids = create_trained_index(reader, layer, memory_budget, factory,
                                                np.random.default_rng(seed), device, phases, progress)
    start = index.meta.images_indexed
    # One read of the store feeds the index, the re-rank file and — when every vector passes
    # through (a new index) — the recall probe's exact top-k. The probe's queries (stored
    # patches, never training points) are held out of the index until tuning is done, so
    # the recall it tunes on is that of a query the index has not seen, as bench.index measures.
    truth: StreamingTopK | None = None
    probe_ids = np.empty(0, np.int64)
    if start == 0:
        probe_ids, probe_vecs = _sample_patches(reader, layer, n_queries, np.random.default_rng(seed + 1),
                                                train_ids, per_image=1)
        if train_ids and np.isin(probe_ids, np.fromiter(train_ids, np.int64)).any():
            raise AssertionError("recall probe drew a training point")  # _sample_patches excludes them
        truth = StreamingTopK(probe_vecs, k)
    added = add_new_vectors(reader, layer, index, truth, reusable_rerank_rows, phases, progress, held_out=probe_ids)
    needs_recall = added > 0 or index.meta.recall is None
    if needs_recall:
        if truth is not None:
            probe = RecallProbe(truth.queries, truth.ids, k)
        else:  # an update saw only the new vectors: the truth needs a scan of them all
            t = time.perf_counter()
            probe = RecallProbe.sample(reader, layer, k, n_queries, exclude=train_ids, seed=seed + 1)
            phases["probe_truth_s"] = time.perf_counter() - t
        measure_and_tune(reader, layer, index, probe, tune, target_recall, phases, progress,
                         held_out=probe_ids.size > 0)
    if probe_ids.size:  # the held-out probe queries are stored patches too: now searchable
        assert truth is not None
        index.add(truth.queries, probe_ids)
        added += int(probe_ids.size)
    if created or needs_recall or start != reader.n_images:  # else nothing changed: files untouched
        index.meta.build_seconds = round(time.perf_counter() - t0, 3)
        index.meta.build_phases = {name: round(v, 3) for name, v in phases.items()}
        index.save(reader.url, layer, reader.storage_options)
        _drop_unused_rerank_file(reader, layer, index.meta)
    return IndexUpdate(index.meta, added)


def _drop_unused_rerank_file(reader: StoreReader, layer: str, meta: IndexMeta) -> None:
    """Delete a re-rank file the saved index no longer uses (a rebuild chose exact codes, or
    codes whose file does not fit the budget): left behind, it would hold bytes the budget
    no longer counts. Readers that map it keep their pages (POSIX keeps an unlinked inode)."""
    path = rerank_path(reader.url, layer)
    if meta.rerank is None and path is not None and os.path.exists(path):
        os.unlink(path)


def load_extendable_index(reader: StoreReader, layer: str,
                          memory_budget: int | None = None) -> PatchIndex | None:
    """The saved index, if it can be extended: None when missing, unreadable, or describing a
    larger (rebuilt) store — then a new one is built rather than garbage extended — and None
    when extending it would break the memory budget (``memory_budget``, else the one it was
    built for) or keep an exact scan past the size where the ladder leaves it (a store that
    grew from 1k to 100k images would otherwise scan 20M values a query forever)."""
    try:
        index = PatchIndex.load(reader.url, layer, storage_options=reader.storage_options)
    except FileNotFoundError:
        return None
    except Exception as exc:  # stale or corrupt
        log.warning("rebuilding index for %s: %s", layer, exc)
        return None
    if index.meta.images_indexed > reader.n_images:
        return None  # the store was rebuilt smaller: the index describes other data
    g = reader.geometry(layer)
    n_vectors = int(reader.table().ok.sum()) * g.patches_per_image
    budget = memory_budget if memory_budget is not None else index.meta.memory_budget
    factory = index.meta.factory
    grown = _choice_for(factory, n_vectors, g.dim, reader.n_images * g.patches_per_image,
                        rerank_file=index.meta.choice.rerank_file if index.meta.choice else True)
    if budget is not None and grown.total_bytes > budget:
        log.warning("rebuilding index for %s: %s for %d vectors needs %.1f MB, over the %.1f MB budget",
                    layer, factory, n_vectors, grown.total_bytes / 1e6, budget / 1e6)
        return None
    if index.is_graph and n_vectors - index.ntotal > GRAPH_APPEND_SHARE * index.ntotal:
        log.warning("rebuilding index for %s: %d new vectors onto an HNSW graph of %d (a batch that large "
                    "joins a graph badly)", layer, n_vectors - index.ntotal, index.ntotal)
        return None
    if factory in ("IDMap,Flat", "IDMap,SQfp16") and index.meta.choice is not None:
        wanted = choose_index(n_vectors, g.dim, budget).factory
        if wanted != factory:
            log.warning("rebuilding index for %s: %d vectors have outgrown an exact scan (%s now)",
                        layer, n_vectors, wanted)
            return None
    return index


def _choice_for(factory: str, n_vectors: int, dim: int, rerank_rows: int, rerank_file: bool = True,
                reason: str = "given (factory=...)") -> IndexChoice:
    """What a given factory costs at this size (the budget check for explicit factories and
    for extending an index): index bytes plus, for compressed codes with a file, the re-rank file."""
    compressed = codes_of(factory) not in EXACT_CODES or "PQ" in factory
    with_file = compressed and rerank_file
    return IndexChoice(factory, reason, estimate_index_bytes(factory, n_vectors, dim),
                       rerank_rows * dim * RERANK_BYTES_PER_VALUE if with_file else 0, with_file)


def layer_index_size(reader: StoreReader, layer: str) -> tuple[int, int, int]:
    """(vectors, D, re-rank rows) of the layer's index: ok images' patches, and every committed
    image's rows in the re-rank file (failed images' zero rows too)."""
    g = reader.geometry(layer)
    hw = g.patches_per_image
    return int(reader.table().ok.sum()) * hw, g.dim, reader.n_images * hw


def create_trained_index(reader: StoreReader, layer: str, memory_budget: int | None,
                         factory: str | None, rng: np.random.Generator, device: str,
                         phases: dict[str, float], progress: ProgressReporter) -> tuple[PatchIndex, set[int]]:
    """A new empty index of the factory that fits the budget, trained on a sample of the layer;
    returns it with the training points' ids (kept out of the recall probe)."""
    g = reader.geometry(layer)
    n_vectors, _, rerank_rows = layer_index_size(reader, layer)
    budget = memory_budget if memory_budget is not None else default_index_budget()
    choice = _choice_for(factory, n_vectors, g.dim, rerank_rows) if factory else \
        choose_index(n_vectors, g.dim, budget, rerank_rows=rerank_rows)
    chosen = choice.factory
    index = PatchIndex.create(g.dim, chosen, ef_construction=choice.ef_construction)
    index.meta.memory_budget = budget
    index.meta.choice = ChoiceRecord(factory=chosen, reason=choice.reason, index_bytes=choice.index_bytes,
                                     rerank_bytes=choice.rerank_bytes, budget=budget,
                                     rerank_file=choice.rerank_file, ef_construction=choice.ef_construction)
    log.info("%s: index %s for %d x %d vectors: %s; counts %.1f MB (index %.1f + re-rank file %.1f) "
             "of the %.1f MB budget", layer, chosen, n_vectors, g.dim, choice.reason, choice.total_bytes / 1e6,
             choice.index_bytes / 1e6, choice.rerank_bytes / 1e6, budget / 1e6)
    train_ids: set[int] = set()
    if not index.is_trained:
        nlist = nlist_for(n_vectors)
        # at most half of the vectors, so the recall probe has patches training never saw
        n_train = min(MAX_TRAIN, nlist * TRAIN_POINTS_PER_CENTROID, max(1, n_vectors // 2))
        n_train = min(n_train, MAX_TRAIN_BYTES // (4 * g.dim))
        t = time.perf_counter()
        with progress.phase(f"{layer}: sampling training vectors", n_train, unit="vectors") as phase:
            ids, sample = _sample_patches(reader, layer, n_train, rng)
            phase.update(len(ids))
        phases["sample_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with progress.phase(f"{layer}: training {chosen}", 1, unit="steps") as phase:
            index.train(sample, use_gpu=device.startswith("cuda"))  # FAISS GPU k-means if installed
            phase.update(1)
        phases["train_s"] = time.perf_counter() - t
        index.meta.train_points = len(ids)
        train_ids = set(ids.tolist())
        del sample
    index.meta.images_indexed = 0
    index.meta.built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return index, train_ids


def add_new_vectors(reader: StoreReader, layer: str, index: PatchIndex, truth: StreamingTopK | None,
                    reusable_rerank_rows: int, phases: dict[str, float],
                    progress: ProgressReporter, held_out: np.ndarray | None = None) -> int:
    """Add the vectors of images committed since ``images_indexed`` (and, for compressed codes,
    their fp16 re-rank rows; ``truth`` accumulates the probe's exact top-k); returns how many.

    Patch ids in ``held_out`` (the probe's queries) go neither into the index nor into the
    truth (a held-out query's neighbours are the other vectors); the caller adds them later."""
    held = np.asarray(held_out if held_out is not None else [], dtype=np.int64)
    g = reader.geometry(layer)
    start = index.meta.images_indexed
    rerank: RerankAppender | None = None
    file_fits = index.meta.choice is None or index.meta.choice.rerank_file  # v1 metadata: as before
    if not index.stores_exact_vectors and file_fits and rerank_path(reader.url, layer) is not None:
        # compressed codes: keep the exact fp16 vectors beside them for a fast re-rank
        valid = index.meta.rerank_rows if start else reusable_rerank_rows
        rerank = RerankAppender(reader, layer, valid)
    ok, hw = reader.table().ok, g.patches_per_image
    added = 0
    t = time.perf_counter()
    phase = progress.phase(f"{layer}: adding to the index", reader.n_images - start)
    # An HNSW graph gets all of its new vectors in one add: FAISS inserts a batch from its
    # highest level down, and a graph grown batch by batch is much worse (100k x 112 in two
    # halves: recall@32 0.905 at efSearch 32, against 0.975 in one add; measured).
    pending: list[tuple[np.ndarray, np.ndarray]] | None = [] if index.is_graph else None
    try:
        for ids, vecs in iter_vector_blocks(reader, layer, images_per_block=max(reader.attrs.chunk, 256),
                                            ok_only=False, start=start):
            if rerank is not None:
                rerank.feed(int(ids[0]) // hw, vecs)  # every image's rows, failed images' zeros too
            images_in_block = -(-len(ids) // hw)
            keep = ok[ids // hw]
            if held.size:
                keep &= ~np.isin(ids, held)
            ids, vecs = ids[keep], vecs[keep]
            if pending is not None:
                pending.append((ids, vecs))  # fp16 until the one add
            else:
                index.add(vecs, ids)
            if truth is not None:
                truth.add(ids, vecs)
            added += len(ids)
            phase.update(images_in_block)
        if pending:
            all_ids = np.concatenate([p[0] for p in pending])
            all_vecs = np.concatenate([p[1] for p in pending])
            pending.clear()
            index.add(all_vecs, all_ids)
            del all_vecs
        if rerank is not None:
            index.meta.rerank = RerankRecord(rows=rerank.close(), dtype="float16",
                                             file=f"{encode_layer(layer)}.f16",
                                             store_created=reader.attrs.created)
    except BaseException:
        if rerank is not None:
            rerank.abort()
        raise
    finally:
        phase.close()
    phases["pass_s"] = time.perf_counter() - t  # index add + re-rank rows + probe truth
    index.meta.images_indexed = reader.n_images
    index.meta.nlist = index.nlist
    return added


def measure_and_tune(reader: StoreReader, layer: str, index: PatchIndex, probe: RecallProbe,
                     tune: bool, target_recall: float, phases: dict[str, float],
                     progress: ProgressReporter, held_out: bool = False) -> None:
    """Tune the search parameters on ``probe`` (IVF, compressed codes), then record recall@k and
    the single-thread p50 latency of search + re-rank in the index's metadata."""
    exact = index.meta.factory in ("IDMap,Flat", "IDMap,SQfp16")
    t = time.perf_counter()
    if tune and not (index.stores_exact_vectors and not index.nlist and not index.is_graph):
        what = "efSearch" if index.is_graph else "nprobe"
        with progress.phase(f"{layer}: tuning {what}", None, unit="settings") as phase:
            index.meta.tuned = TuneRecord(
                **tune_search(reader, layer, index, probe, target_recall, phase.update),
                target_recall=target_recall,
                rule=f"lower {TUNE_Z}-sigma bound of the probe's mean recall >= target")
    phases["tune_s"] = time.perf_counter() - t
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the explorer's setting (stores.search.LayerSearch)
    try:
        recall = probe.recall(reader, layer, index)
    finally:
        faiss.omp_set_num_threads(threads)
    index.meta.recall = RecallRecord(k=probe.k, value=recall, queries=len(probe.queries), exact_index=exact,
                                     p50_ms=round(probe.last_latency_ms, 3),
                                     measured="index search + exact re-rank vs exact scan, tie-aware"
                                              + ("; queries held out of the index until measured" if held_out else
                                                 "; queries are indexed patches")
                                              + "; p50_ms: one query at a time on one thread, at this build")
