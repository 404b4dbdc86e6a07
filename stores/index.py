"""FAISS inner-product indexes over a layer's patch vectors, with exact re-rank.

Ids in every index are global patch ids (see :mod:`stores.geometry`). Because vectors are
unit length, inner product = cosine. Approximate indexes (IVF, PQ) only propose candidates:
:func:`search_reranked` re-scores them exactly from the stored fp16 vectors, so scores shown
to users are always true cosines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from .errors import IndexBudgetError, StoreError
from .format import INDEX_DIR, encode_layer
from .index_meta import INDEX_META_VERSION, IndexMeta
from .kmeans import TWO_LEVEL_FROM, CentroidGroups, ivf_centroids
from .localfiles import temp_file_in
from .urls import filesystem, is_local, normalize_url

#: An exact scan (``IDMap,Flat`` / ``IDMap,SQfp16``) is the index while its estimated cost per
#: query (:func:`exact_scan_ms`) is at most this many milliseconds: a small store's user gets
#: exact hits (the 15-image demo's 2,940 x 672 layer had an HNSW graph at recall@10 0.973, where
#: a scan takes 0.25-0.3 ms), and a large store's hover is not slowed past a millisecond by it.
EXACT_SCAN_MAX_MS = 1.0
#: The speed an exact scan is assumed to have, in vector values (n·D) per second on one core:
#: a conservative constant, never timed at build time (the choice must be deterministic).
#: Measured with FAISS single-threaded top-32 searches on this project's 2-core machine, under
#: load from other jobs: p50 4.4-8.9 G values/s for 1-3M values (D = 64, 112, 512, 672; Flat
#: and SQfp16 alike; 2,940 x 672 in 0.25-0.28 ms), 2.6 G values/s for Flat once the codes
#: leave the cache (100k x 112, 11M values, 4.3 ms) and 2.9 at 20k x 512. 2e9 is below every
#: p50 measured up to 11M values; only far past the bound did Flat fall below it (1.9 G values/s
#: at 200k x 64, 12.8M values, where the ladder takes a graph anyway).
EXACT_SCAN_VALUES_PER_S = 2e9
#: The n·D at which :data:`EXACT_SCAN_MAX_MS` is reached: 2,000,000 values, i.e. ~17.8k vectors
#: at D=112, 3.9k at D=512, 2,976 at D=672. (It was 2^20 values before; before that 22M,
#: 100k x 112 at 1.7-4.4 ms a query, where HNSW32 answers at recall 0.95 in 0.06-0.1 ms:
#: issue #16.)
FLAT_MAX_VALUES = int(EXACT_SCAN_MAX_MS * 1e-3 * EXACT_SCAN_VALUES_PER_S)
#: Below this many vectors per centroid FAISS warns and clusters poorly.
MIN_POINTS_PER_CENTROID = 39
#: HNSW graphs up to this many vectors. Past it the graph's build outweighs its search speed
#: and IVF lists take over: on this 2-core machine, quiet, FAISS's HNSW32 over 10M x 112 took
#: 1,958 s against 155 s for the ladder's IVF12649_HNSW32,SQ8, and answered at recall 0.95 in
#: 0.40 ms against 1.14 ms (docs/performance.md); at D=512 the graph's build is several times longer.
HNSW_MAX_VECTORS = 2_000_000
#: Graph degree of the HNSW indexes the ladder builds (then a smaller one for tight budgets).
HNSW_M = 32
HNSW_SMALL_M = 16


def hnsw_ef_construction(dim: int) -> int:
    """The construction beam for a graph over D-dimensional vectors, as measured on the
    benchmark's clusters (100k held-out queries, recall@32, fp16 codes, M=32): at D=112
    FAISS's default 40 is best at small efSearch (efSearch 16: 0.954, where 64 gives 0.888
    and 100 gives 0.902) and reaches 0.99 by efSearch 32; at D=512 a beam of 40 leaves the
    graph too sparse (recall plateaus at 0.974-0.980, even at efSearch 256) and 128 reaches
    0.990 at efSearch 48, at the same speed at 0.95. Wide vectors get 128."""
    return 40 if dim <= 256 else 128


#: efSearch tuning stops here (a search of this beam costs milliseconds at 1M vectors).
MAX_EF_SEARCH = 4096


#: Past this many centroids the coarse quantizer is an HNSW graph: assigning 10M vectors to 12k
#: flat centroids costs ~30 TFLOP at D=112, through HNSW a few hundred distances per vector.
HNSW_QUANTIZER_FROM = 4096
#: efSearch of an HNSW coarse quantizer while adding: finding one vector's nearest centroid.
#: Measured on 100k real-geometry vectors (D=512) into 12,649 centroids: efSearch 16 agrees
#: with the exact nearest centroid for 98.6% of vectors (64: 99.0%, 128: 99.4%) in half the
#: time of 64 — and a vector in its second-nearest list is still found by the searches that
#: probe it. Only IVF behind OPQ still assigns through the graph (see PatchIndex.add).
ADD_QUANTIZER_EF = 16
#: Candidates re-ranked per wanted result for compressed codes; tuning doubles it (up to
#: MAX_RERANK_FACTOR) when probing every list still misses the recall target (coarse PQ codes).
DEFAULT_RERANK_FACTOR = 4
MAX_RERANK_FACTOR = 64
#: Bytes FAISS keeps per vector besides its code (the int64 id in the inverted list or IDMap).
ID_BYTES = 8
#: Codes whose scores equal the exact inner product of the stored fp16 vectors: float32 copies
#: and fp16 copies (the stored vectors *are* fp16, so SQfp16 loses nothing).
EXACT_CODES = ("Flat", "SQfp16")
#: Bytes of the re-rank file per row (fp16 copies of the vectors, stores.rerank).
RERANK_BYTES_PER_VALUE = 2
#: Headers, the serialized FAISS structures' fixed parts, and rounding: added to every estimate
#: so a file never exceeds what the choice counted.
ESTIMATE_SLACK_BYTES = 16 << 10
ESTIMATE_SLACK_SHARE = 0.01


@dataclass(frozen=True)
class IndexChoice:
    """One rung of the ladder: a factory, what it costs, and why it would be taken.

    ``index_bytes`` estimates the .faiss file (what a loaded index holds in memory),
    ``rerank_bytes`` the fp16 re-rank file beside it (0 for exact codes, and for compressed
    codes whose file does not fit: their candidates are then re-scored from the Zarr store).
    The memory budget covers both.
    """

    factory: str
    reason: str
    index_bytes: int
    rerank_bytes: int = 0
    rerank_file: bool = False
    ef_construction: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.rerank_bytes


def codes_of(factory: str) -> str:
    """The vector codes a factory stores: ``IVF…,SQ8`` → SQ8, ``IDMap,HNSW32`` → Flat,
    ``IDMap,HNSW32_SQfp16`` → SQfp16 (an HNSW graph keeps its vectors in a flat storage)."""
    last = factory.split(",")[-1]
    if last.startswith("HNSW"):
        _, _, storage = last.partition("_")
        return storage or "Flat"
    return last


def code_bytes(code: str, dim: int) -> float:
    """Bytes of one vector's code: Flat 4·D, SQfp16 2·D, SQ8 D, SQ4 D/2, PQm m (8-bit)."""
    if code == "Flat":
        return 4.0 * dim
    if code == "SQfp16":
        return 2.0 * dim
    if code == "SQ8":
        return float(dim)
    if code == "SQ4":
        return dim / 2
    if code.startswith("PQ"):
        return float(code.removeprefix("PQ").split("x")[0])
    raise ValueError(f"no size known for codes {code!r}")


def hnsw_graph_bytes(n_vectors: int, m: int) -> float:
    """Bytes of an HNSW graph's links: 2·M int32 neighbours on level 0, M on each upper level
    (a vector reaches level l with probability M^-l, so M/(M-1) upper links on average), an
    8-byte offset and a 4-byte level per vector: ≈ 8·M + 16 bytes (272 at M=32; measured
    720 B per vector for HNSW32 at D=112 = 448 + 272)."""
    return n_vectors * (4.0 * (2 * m + m / (m - 1)) + 12)


def exact_scan_ms(n_vectors: int, dim: int) -> float:
    """Estimated milliseconds of one exact-scan query over ``n_vectors`` x ``dim``: n·D values
    at :data:`EXACT_SCAN_VALUES_PER_S`. A pure function of the sizes (no timing), so the same
    store always gets the same index."""
    return n_vectors * dim / EXACT_SCAN_VALUES_PER_S * 1e3


def exact_scan_is_fast(n_vectors: int, dim: int) -> bool:
    """Whether an exact scan's estimated query cost is within :data:`EXACT_SCAN_MAX_MS`."""
    return exact_scan_ms(n_vectors, dim) <= EXACT_SCAN_MAX_MS


def _slack(nbytes: float) -> int:
    return int(math.ceil(nbytes * (1 + ESTIMATE_SLACK_SHARE) + ESTIMATE_SLACK_BYTES))


def estimate_index_bytes(factory: str, n_vectors: int, dim: int) -> int:
    """Bytes of the .faiss file ``factory`` makes for ``n_vectors`` × ``dim`` (with slack).

    Counts per vector the codes and the id (IVF lists and IDMap store int64 ids) and, for HNSW,
    the graph's links; fixed: IVF centroids (4·D each, plus their graph for an HNSW coarse
    quantizer), OPQ's D×D rotation, PQ's 256 centroids per sub-quantizer, SQ8/SQ4's per-dimension
    ranges. A pure function, so tests hold the built files to it.
    """
    parts = factory.split(",")
    code = codes_of(factory)
    total = n_vectors * (code_bytes(code, dim) + ID_BYTES)
    if code in ("SQ8", "SQ4"):
        total += 2 * 4 * dim
    if code.startswith("PQ"):
        total += 256 * dim * 4  # 2^8 centroids of D/m values for each of m sub-quantizers
    for part in parts:
        if part.startswith("OPQ"):
            total += 4 * dim * dim + 4 * dim
        elif part.startswith("HNSW"):
            total += hnsw_graph_bytes(n_vectors, int(part[4:].partition("_")[0]))
        elif part.startswith("IVF"):
            head, _, quantizer = part[3:].partition("_")
            nlist = int(head)
            total += nlist * (4 * dim + 3 * ID_BYTES)  # centroids + one list header each
            if quantizer.startswith("HNSW"):
                total += hnsw_graph_bytes(nlist, int(quantizer[4:]))
    return _slack(total)


def index_ladder(n_vectors: int, dim: int, rerank_rows: int | None = None) -> list[IndexChoice]:
    """Every index the build may choose for ``n_vectors`` × ``dim``, fastest first at the same
    recall; :func:`choose_index` takes the first that fits the budget.

    - while an exact scan's estimated query cost is within EXACT_SCAN_MAX_MS (1 ms,
      :func:`exact_scan_is_fast`: n·D ≤ FLAT_MAX_VALUES = 2M values): an exact scan
      (``IDMap,Flat``, then ``IDMap,SQfp16``);
    - up to HNSW_MAX_VECTORS: an HNSW graph over fp16 copies of the stored vectors
      (``IDMap,HNSW32_SQfp16``, efConstruction :func:`hnsw_ef_construction`). Its scores are
      exact (the stored vectors are fp16); against FAISS's HNSW32 over float32 it is the same
      graph (at D ≤ 256) reading half the bytes per distance (bench.index). Then M=16;
    - IVF with K ≈ 4·√n lists (an HNSW coarse quantizer past 4096): ``Flat``, ``SQ8`` with the
      fp16 re-rank file, ``SQfp16`` (exact, no file);
    - then compressed codes whose re-rank file no longer fits: ``SQ8``, ``SQ4``, OPQ+PQ (m
      the divisors of D ≤ 64, largest first, each with K, K/4, … lists: at small n the
      centroids and PQ tables are a large share of a small budget) — their candidates are
      re-scored from the Zarr store, slower but exact.

    ``rerank_rows`` (default ``n_vectors``) is the re-rank file's rows: every image's patches,
    failed images' zero rows included.
    """
    n = n_vectors
    rerank = (n_vectors if rerank_rows is None else rerank_rows) * dim * RERANK_BYTES_PER_VALUE
    out: list[IndexChoice] = []

    def add(factory: str, reason: str, compressed: bool = False, file: bool = True,
            ef: int | None = None) -> None:
        with_file = compressed and file
        out.append(IndexChoice(factory, reason, estimate_index_bytes(factory, n, dim),
                               rerank if with_file else 0, with_file, ef))

    small = exact_scan_is_fast(n, dim)
    if small:
        ms = exact_scan_ms(n, dim)
        add("IDMap,Flat", f"exact scan: {n:,} x {dim} values, about {ms:.2f} ms a query (within "
            f"{EXACT_SCAN_MAX_MS:g} ms at {EXACT_SCAN_VALUES_PER_S / 1e9:g}G values/s): exact hits")
        add("IDMap,SQfp16", f"exact scan of fp16 copies, about {ms:.2f} ms a query (the float32 scan "
            f"does not fit)")
    if n <= HNSW_MAX_VECTORS and n > 1:
        ef = hnsw_ef_construction(dim)
        add(f"IDMap,HNSW{HNSW_M}_SQfp16", f"HNSW graph over fp16 codes (exact scores, no re-rank file, "
            f"efConstruction {ef}): fastest at matched recall up to {HNSW_MAX_VECTORS:,} vectors", ef=ef)
        add(f"IDMap,HNSW{HNSW_SMALL_M}_SQfp16", f"HNSW graph of degree {HNSW_SMALL_M} over fp16 codes "
            f"(the degree-{HNSW_M} graph does not fit)", ef=ef)
    k = nlist_for(n)
    coarse = f"IVF{k}_HNSW32" if k > HNSW_QUANTIZER_FROM else f"IVF{k}"
    big = "" if n <= HNSW_MAX_VECTORS else f" (past {HNSW_MAX_VECTORS:,} vectors a graph takes hours to build)"
    add(f"{coarse},Flat", f"IVF lists of float32 vectors, exact{big}")
    add(f"{coarse},SQ8", f"IVF lists of 8-bit codes + fp16 re-rank file{big}", compressed=True)
    add(f"{coarse},SQfp16", f"IVF lists of fp16 codes, exact, no re-rank file{big}")
    why = "the fp16 re-rank file does not fit: candidates are re-scored from the Zarr store (slower)"
    add(f"{coarse},SQ8", f"IVF lists of 8-bit codes; {why}", compressed=True, file=False)
    add(f"{coarse},SQ4", f"IVF lists of 4-bit codes; {why}", compressed=True, file=False)
    divisors = sorted((m for m in range(1, min(dim, 64) + 1) if dim % m == 0), reverse=True)
    for m in divisors:  # the code size decides the ranking quality, so the largest m first,
        for lists in sorted({max(1, k // 4 ** i) for i in range(6)}, reverse=True):  # then fewer lists
            quantizer = f"IVF{lists}_HNSW32" if lists > HNSW_QUANTIZER_FROM else f"IVF{lists}"
            add(f"OPQ{m},{quantizer},PQ{m}", f"OPQ+PQ{m} codes, {lists} lists; {why}", compressed=True, file=False)
    if not small:
        add("IDMap,SQfp16", "exact scan of fp16 copies: nothing smaller fits")
    return out


def smallest_index(n_vectors: int, dim: int, rerank_rows: int | None = None) -> IndexChoice:
    """The rung of :func:`index_ladder` with the fewest bytes (index + re-rank file): its
    ``total_bytes`` is the smallest budget :func:`choose_index` accepts for this size.

    A pure function of the sizes, so ``hoverlay build`` computes it before its first write (from
    the images it is about to add) and the index phase after the commit, from the same numbers.
    It never decreases with ``n_vectors`` (every rung's bytes grow with n, the exact fp16 scan
    is always a rung, and the IVF/PQ rungs' lists grow with n), so a budget that passes the
    build's check, counting every new image as decoded, also passes once some failed."""
    return min(index_ladder(n_vectors, dim, rerank_rows), key=lambda c: c.total_bytes)


def _decimal_size(nbytes: int) -> str:
    """``nbytes`` rounded *up* to a short decimal size: 17,064 -> 17.1 kB, 2,100,000 -> 2.1 MB."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            tenths = -(-nbytes * 10 // scale)
            return f"{tenths // 10}.{tenths % 10} {unit}" if tenths % 10 else f"{tenths // 10} {unit}"
    return f"{nbytes} B"


def check_index_budget(memory_budget: int | None, sizes: dict[str, tuple[int, int, int | None]]) -> None:
    """Refuse ``memory_budget`` bytes when it is below the smallest index of any layer.

    ``sizes`` maps each layer (or a description) to ``(n_vectors, dim, rerank_rows)``. The
    :class:`IndexBudgetError` names the budget, the layer that needs the most, its smallest
    index (:func:`smallest_index`), and the smallest budget that works for every layer given."""
    if memory_budget is None or not sizes:
        return
    needs = {name: smallest_index(n, dim, rows) for name, (n, dim, rows) in sizes.items()}
    name, worst = max(needs.items(), key=lambda kv: kv[1].total_bytes)
    need = worst.total_bytes
    if memory_budget >= need:
        return
    n, dim, _ = sizes[name]
    where = f"layer {name!r}: " if name else ""
    raise IndexBudgetError(
        f"index memory budget {memory_budget:,} B (--index-memory, keyword index_memory) is below the "
        f"smallest index for {where}{n:,} x {dim} vectors ({worst.factory}, {need:,} B): the smallest "
        f"budget that works is --index-memory {need} ({_decimal_size(need)}); or build with --no-index "
        f"(the explorer then scans exactly)")


def choose_index(n_vectors: int, dim: int, memory_budget: int | None = None,
                 rerank_rows: int | None = None) -> IndexChoice:
    """The first rung of :func:`index_ladder` whose index + re-rank file fit ``memory_budget``
    bytes (None: no limit). Raises :class:`IndexBudgetError` (:func:`check_index_budget`) when
    not even the smallest does: a budget is a promise, and an index bigger than asked is worse
    than none (the explorer then scans)."""
    for choice in index_ladder(n_vectors, dim, rerank_rows):
        if memory_budget is None or choice.total_bytes <= memory_budget:
            return choice
    check_index_budget(memory_budget, {"": (n_vectors, dim, rerank_rows)})
    raise AssertionError("a budget below every rung is below the smallest")  # pragma: no cover


def choose_factory(n_vectors: int, dim: int, memory_budget: int | None = None) -> str:
    """The FAISS factory string :func:`choose_index` picks (see :func:`index_ladder`).

    SQ8/SQ4/PQ scores are approximate; :func:`search_reranked` re-scores their candidates from
    the stored fp16 vectors (the re-rank file, :mod:`stores.rerank`, or the store), so users
    only see exact cosines.
    """
    return choose_index(n_vectors, dim, memory_budget).factory


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu (which has no GPU functions at all in some builds)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def nlist_for(n_vectors: int) -> int:
    """K ≈ 4·√n centroids, bounded so every centroid gets enough training points."""
    k = int(4 * math.sqrt(max(1, n_vectors)))
    k = min(k, max(1, n_vectors // MIN_POINTS_PER_CENTROID))
    return max(1, k)


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, int(round(math.sqrt(nlist)))))


@dataclass
class PatchIndex:
    """A FAISS index over one layer plus the metadata stored beside it (``index/<layer>.json``)."""

    index: faiss.Index
    meta: IndexMeta
    _groups: CentroidGroups | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, dim: int, factory: str, ef_construction: int | None = None) -> PatchIndex:
        """An empty index of ``factory`` (inner product); ``ef_construction`` sets an HNSW
        graph's construction beam (FAISS's default 40 when None)."""
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        if factory.split(",")[-1] == "SQfp16":
            # FAISS encodes IVF residuals (vector - centroid) by default; fp16 copies of the
            # vectors themselves are what make SQfp16 scores exact.
            with contextlib.suppress(RuntimeError):  # not IVF (IDMap,SQfp16): no residuals anyway
                faiss.extract_index_ivf(index).by_residual = False
        graph = hnsw_graph(index)
        if graph is not None and ef_construction:
            graph.hnsw.efConstruction = int(ef_construction)
        return cls(index, IndexMeta(factory=factory, dim=int(dim)))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: np.ndarray, use_gpu: bool = False) -> None:
        """Train on ``sample`` (float32 rows). With ``use_gpu`` and a GPU build of FAISS, the IVF
        k-means (the expensive part) runs on every visible GPU; otherwise on the CPU."""
        nlist = self.nlist
        on_gpu = use_gpu and gpu_count() > 0 and nlist is not None
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if on_gpu:
            ivf = faiss.extract_index_ivf(self.index)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
            self.index.train(sample)
        elif nlist is not None and nlist >= TWO_LEVEL_FROM:
            _train_with_centroids(self.index, sample)
            self.meta.kmeans = "two-level"
        else:
            self.index.train(sample)
        self.meta.trained_on = "gpu" if on_gpu else "cpu"
        if nlist:
            self.set_params(nprobe=default_nprobe(nlist))

    @property
    def rerank_factor(self) -> int:
        """Candidates per wanted result for compressed codes (4 unless tuning raised it)."""
        return int(self.meta.rerank_factor or DEFAULT_RERANK_FACTOR)

    @property
    def stores_exact_vectors(self) -> bool:
        """True when the index's codes reproduce the stored fp16 vectors (its scores are exact)."""
        factory = self.meta.factory
        return codes_of(factory) in EXACT_CODES and "PQ" not in factory

    @property
    def is_graph(self) -> bool:
        """True for an HNSW graph index (searched with ``efSearch``, not IVF's ``nprobe``)."""
        return hnsw_graph(self.index) is not None

    @property
    def nlist(self) -> int | None:
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return None
        return int(ivf.nlist)

    def set_params(self, **params: Any) -> None:
        """Search-time parameters (``nprobe``, ``quantizer_efSearch``) through FAISS's ParameterSpace.

        With an HNSW coarse quantizer, ``nprobe`` alone does nothing past the graph's
        ``efSearch`` (16 by default): the graph search returns at most that many good lists.
        Measured on 10M x 112 (IVF12649_HNSW32,SQ8): nprobe 512 gave recall@32 0.946 with
        efSearch 16 and 0.996 with 1024. So ``quantizer_efSearch`` follows as 2·nprobe (the
        autofaiss rule) unless given.
        """
        if "nprobe" in params and "quantizer_efSearch" not in params and \
                "_HNSW" in self.meta.factory:
            params = {**params, "quantizer_efSearch": max(16, 2 * int(params["nprobe"]))}
        space = faiss.ParameterSpace()
        for name, value in params.items():
            space.set_index_parameter(self.index, name, value)
            self.meta.params[name] = value

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under their patch ids.

        An IVF index of TWO_LEVEL_FROM lists or more gets its lists from grouped centroids
        (:class:`stores.kmeans.CentroidGroups`). FAISS's own add serves the others. Behind
        OPQ that add walks the HNSW coarse quantizer at ``efSearch`` ADD_QUANTIZER_EF, not
        at the search setting: 2·nprobe is ~200 at 10M vectors, which made adding several
        times slower."""
        if not self.is_trained:
            raise StoreError(f"index {self.meta.factory!r} must be trained before adding")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        groups = self._centroid_groups()
        if groups is not None:  # lists from two matrix products, then FAISS encodes and appends
            ivf = faiss.extract_index_ivf(self.index)
            lists = groups.assign(x)
            ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
            return
        hnsw = _hnsw_quantizer(self.index)
        if hnsw is None:
            self.index.add_with_ids(x, ids)
            return
        ef = hnsw.hnsw.efSearch
        hnsw.hnsw.efSearch = ADD_QUANTIZER_EF
        try:
            self.index.add_with_ids(x, ids)
        finally:
            hnsw.hnsw.efSearch = ef

    def _centroid_groups(self) -> CentroidGroups | None:
        """Grouped centroids for adding to a large IVF index (built once per object), or None:
        small IVF, no IVF, or IVF behind a pre-transform (OPQ), which FAISS's own add handles."""
        if self._groups is None:
            ivf = faiss.downcast_index(self.index)
            if not isinstance(ivf, faiss.IndexIVF) or ivf.nlist < TWO_LEVEL_FROM:
                return None
            self._groups = CentroidGroups.build(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        return self._groups

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search: (scores, ids), ids -1 where fewer than k vectors exist."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        return self.index.search(q, int(k))

    # --------------------------------------------------------------- persistence
    def save(self, store_url: str, layer: str, storage_options: dict[str, Any] | None = None) -> None:
        """Write ``index/<layer>.faiss`` and ``.json`` beside it, each renamed into place.

        The .faiss file is replaced before the .json; a reader compares ``ntotal`` from both
        and treats a mismatch as stale, so a crash between the two is detected, never misread.
        """
        self.meta.ntotal = self.ntotal
        self.meta.schema_version = INDEX_META_VERSION  # an index read from a v1 file is written as v2
        data = faiss.serialize_index(self.index).tobytes()
        base = index_path(store_url, layer)
        _atomic_write(base + ".faiss", data, storage_options)
        _atomic_write(base + ".json", json.dumps(self.meta.to_json(), indent=2, sort_keys=True).encode(),
                      storage_options)

    @classmethod
    def load(cls, store_url: str, layer: str, mmap: bool = False,
             storage_options: dict[str, Any] | None = None) -> PatchIndex:
        base = index_path(store_url, layer)
        meta = read_index_meta(store_url, layer, storage_options)
        if meta is None:
            raise FileNotFoundError(f"no index for layer {layer!r} at {base}.faiss")
        faiss_url = base + ".faiss"
        if is_local(faiss_url):
            local = normalize_url(faiss_url)
            flags = _MMAP_FLAGS | faiss.IO_FLAG_READ_ONLY if mmap else 0
            index = faiss.read_index(local, flags)
        else:
            fs, path = filesystem(faiss_url, storage_options)
            index = faiss.deserialize_index(np.frombuffer(fs.cat_file(path), dtype=np.uint8))
        if meta.ntotal != int(index.ntotal):
            raise StoreError(f"index for layer {layer!r} is stale: .json says ntotal="
                             f"{meta.ntotal}, .faiss holds {index.ntotal}")
        out = cls(index, meta)
        if out.meta.params:
            out.set_params(**out.meta.params)
        return out


def hnsw_graph(index: faiss.Index) -> Any:
    """The HNSW graph index at the top of ``index`` (behind an IDMap), or None (IVF, flat)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _hnsw_quantizer(index: faiss.Index) -> Any:
    """The HNSW coarse quantizer of an IVF index, or None."""
    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:
        return None
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def _train_with_centroids(index: faiss.Index, sample: np.ndarray) -> None:
    """Train an IVF index (behind any pre-transforms such as OPQ) with two-level k-means
    centroids: FAISS skips its own k-means when the quantizer already holds nlist centroids,
    and trains only the codes."""
    outer = faiss.downcast_index(index)
    x = sample
    if isinstance(outer, faiss.IndexPreTransform):
        chain: Any = outer.chain  # a SWIG vector (the stubs say list)
        for i in range(chain.size()):
            transform = chain.at(i)
            if not transform.is_trained:
                transform.train(x)
            x = np.ascontiguousarray(transform.apply(x), dtype=np.float32)
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(ivf_centroids(x, int(ivf.nlist)))
    ivf.train(x)
    outer.is_trained = True


#: Map the file instead of reading it. ``IO_FLAG_MMAP`` maps IVF inverted lists only; a flat
#: index was still read whole (100 MB of heap for 400k x 64, measured); ``IO_FLAG_MMAP_IFC``
#: (FAISS >= 1.9) maps flat codes too, leaving a few MB of heap.
_MMAP_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)


def read_index_meta(store_url: str, layer: str,
                    storage_options: dict[str, Any] | None = None) -> IndexMeta | None:
    """The layer's ``index/<layer>.json`` (validated), or None when there is none."""
    url = index_path(store_url, layer) + ".json"
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        return None
    try:
        data = json.loads(fs.cat_file(path))
    except ValueError as exc:
        raise StoreError(f"index metadata {url} is not valid JSON: {exc}") from None
    return IndexMeta.from_json(data, url)


def index_path(store_url: str, layer: str) -> str:
    return f"{normalize_url(store_url).rstrip('/')}/{INDEX_DIR}/{encode_layer(layer)}"


def _atomic_write(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    if is_local(url):
        path = normalize_url(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = temp_file_in(os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:  # object stores replace whole objects atomically on PUT
        fs, path = filesystem(url, storage_options)
        fs.pipe_file(path, data)


def exact_rerank(query: np.ndarray, candidate_ids: np.ndarray,
                 fetch: Callable[[np.ndarray], np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidates exactly (float32 inner product of stored vectors) and keep the top k."""
    ids = np.unique(candidate_ids[candidate_ids >= 0])
    if ids.size == 0:
        return np.empty(0, np.float32), np.empty(0, np.int64)
    vecs = np.asarray(fetch(ids), dtype=np.float32)
    scores = vecs @ np.asarray(query, dtype=np.float32).ravel()
    order = np.lexsort((ids, -scores))[:k]  # ties broken by id: deterministic results
    return scores[order], ids[order]


def search_reranked(index: PatchIndex, query: np.ndarray, k: int,
                    fetch: Callable[[np.ndarray], np.ndarray],
                    candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k patch ids for one query, always with exact scores.

    Indexes that keep the vectors themselves (``Flat``, ``IVF…,Flat``, ``IVF…,SQfp16``) already
    return exact inner products of the stored vectors, so their k results are final. Compressed
    indexes (SQ8, SQ4, PQ) propose ``candidates`` (default ``index.rerank_factor``·k, tuned at
    build time) that are re-scored with ``fetch``
    (stored fp16 vectors by patch id).
    """
    if index.stores_exact_vectors:
        scores, ids = index.search(query, k)
        keep = ids[0] >= 0
        s, i = scores[0][keep], ids[0][keep]
        order = np.lexsort((i, -s))  # ties broken by id, like exact_rerank
        return s[order].astype(np.float32), i[order].astype(np.int64)
    n_cand = max(k, candidates or index.rerank_factor * k)
    _, ids = index.search(query, n_cand)
    return exact_rerank(query, ids[0], fetch, k)


class StreamingTopK:
    """Exact top-k of fixed queries over vectors fed block by block (:meth:`add`).

    Each block keeps only its own top k (``argpartition``, linear) before merging, so the cost
    is one matmul per block, not a sort of every score. The index build feeds it the blocks it
    adds, so the recall probe's ground truth costs no second read of the store.
    """

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        self.k = int(k)
        self.scores = np.full((len(self.queries), self.k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(self.queries), self.k), -1, dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(self.queries) == 0 or len(ids) == 0:
            return
        k = self.k
        s = self.queries @ np.asarray(vectors, dtype=np.float32).T  # (q, b)
        ids = np.asarray(ids, dtype=np.int64)
        if s.shape[1] > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, cand = np.take_along_axis(s, part, axis=1), ids[part]
        else:
            cand = np.broadcast_to(ids, s.shape)
        for r in range(len(self.queries)):  # merge this block's top k into each query's running top k
            self.scores[r], self.ids[r] = merge_topk(self.scores[r], self.ids[r], s[r], cand[r], k)


def exact_topk(queries: np.ndarray, blocks: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by streaming ``(ids, vectors)`` blocks: the ground truth for recall, and the
    explorer's fallback when a layer has no usable index."""
    top = StreamingTopK(queries, k)
    for ids, vecs in blocks:
        top.add(ids, vecs)
    return top.scores, top.ids


def merge_topk(scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two disjoint result lists (exact scores), best first, ties by smaller id."""
    scores = np.concatenate([scores_a, scores_b]).astype(np.float32)
    ids = np.concatenate([ids_a, ids_b]).astype(np.int64)
    order = np.lexsort((ids, -scores))[:k]
    return scores[order], ids[order]


#: Scores within this of the k-th true score are ties. Both sides are float64 inner products of
#: the stored fp16 values (exact to ~1e-15), so only genuinely equal scores fall inside.
TIE_ATOL = 1e-9


def recall_per_query(found: np.ndarray, truth: np.ndarray, found_scores: np.ndarray | None = None,
                     kth_scores: np.ndarray | None = None, atol: float = TIE_ATOL) -> np.ndarray:
    """Fraction of each query's true top-k found in its top-k (-1 ids ignored), counting ties.

    Without scores: the share of the true ids found. With ``found_scores`` (the exact score of
    each found id) and ``kth_scores`` (each query's k-th true score), a found id outside the
    true list that scores at least the k-th true score (within ``atol``) counts as a hit too:
    when several vectors share the k-th score, any of them is a correct k-th neighbour, and an
    exact index must report 1.0 whichever it returned (it reported 0.998 on real layers whose
    uniform patches repeat the same vector, issue #16). Hits are capped at the true count.
    """
    out = np.empty(len(found), dtype=np.float64)
    for r, (f, t) in enumerate(zip(found, truth, strict=True)):
        valid_f, valid_t = f >= 0, t >= 0
        wanted = max(1, int(valid_t.sum()))
        true_ids = set(t[valid_t].tolist())
        hits = sum(1 for i in f[valid_f].tolist() if i in true_ids)
        if found_scores is not None and kth_scores is not None and hits < wanted:
            others = np.array([i not in true_ids for i in f.tolist()]) & valid_f
            hits += int((np.asarray(found_scores[r])[others] >= float(kth_scores[r]) - atol).sum())
        out[r] = min(hits, wanted) / wanted
    return out


def exact_scores(queries: np.ndarray, ids: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """float64 inner products of each query with the stored vectors of its ids ((q, k), -inf for
    -1 ids): the tie test's scores, the same whatever computed the ranking (FAISS's SIMD float32
    sums and numpy's BLAS round differently)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.full(ids.shape, -np.inf, dtype=np.float64)
    for r, q in enumerate(np.atleast_2d(queries)):
        keep = ids[r] >= 0
        if keep.any():
            out[r, keep] = np.asarray(fetch(ids[r][keep]), dtype=np.float64) @ np.asarray(q, dtype=np.float64)
    return out
