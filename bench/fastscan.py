"""Is a fast-scan PQ rung worth adding to the index ladder? IVF lists of 4-bit PQ codes (FAISS's
SIMD fast scan) + the exact re-rank, against the ladder's IVF-SQ8 + re-rank and FAISS HNSW32.

    python -m bench.fastscan [--vectors 1000000] [--dim 112]

Why: past HNSW_MAX_VECTORS the ladder builds IVF lists of SQ8 codes whose candidates are
re-scored from the fp16 re-rank file; at 10M x 112 that answered at recall 0.95 in 1.14 ms
against HNSW32's 0.40 ms (docs/performance.md, P4). A list of ``PQ{D/2}x4fs`` codes is a
quarter of SQ8's bytes and is scanned with SIMD table lookups. This measures, on the same
vectors (``bench.index``'s clustered mixture) and 500 held-out queries (another seed of the
mixture, never added nor trained on), single-thread p50 per query and tie-aware recall@32
against an exact scan, for each nprobe x re-rank depth (``rf``·k candidates re-scored exactly by
:func:`hoverlay.stores.index.exact_rerank`), and the fastest setting at recall 0.95 and 0.98.

The fast-scan codes are built twice, for inner product and for L2: on unit vectors the two rank
the same, but with inner-product codes (measured at 1M x 112) recall fell as nprobe grew, while
with L2 codes it did not (likely fast scan's 8-bit lookup tables; not verified). Results: ``bench/results/fastscan_d<D>_<n>.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import faiss
import numpy as np

from bench.common import report
from bench.index import exact_scores, exact_top_k, file_bytes, held_out_queries, matched_setting
from hoverlay.stores.index import exact_rerank, nlist_for, recall_per_query

K = 32
NPROBE = (16, 32, 48, 64, 96)
RERANK = (4, 8, 16)
EF_SEARCH = (16, 32, 48, 64, 96)


def measure(search: Any, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            kth: np.ndarray) -> tuple[float, float]:
    """(p50 ms of ``search(query) -> ids`` on one thread, mean tie-aware recall@K)."""
    faiss.omp_set_num_threads(1)
    found = np.full((len(queries), K), -1, dtype=np.int64)
    times = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        ids = search(q)
        times.append(time.perf_counter() - t0)
        found[i, :len(ids)] = ids[:K]
    recall = recall_per_query(found, truth, exact_scores(found, vectors, queries), kth)
    return float(np.median(times) * 1000), float(recall.mean())


def ivf_rows(factory: str, metric: int, vectors: np.ndarray, stored: np.ndarray, queries: np.ndarray,
             truth: np.ndarray, kth: np.ndarray, folder: str) -> list[dict[str, Any]]:
    """Build one IVF index (trained on a sample of the stored vectors) and sweep nprobe x rf."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.index_factory(vectors.shape[1], factory, metric)
    nlist = faiss.extract_index_ivf(index).nlist
    sample = vectors[np.random.default_rng(1).choice(len(vectors), min(len(vectors), 64 * nlist), replace=False)]
    t0 = time.perf_counter()
    index.train(sample)
    index.add(vectors)
    build_s = time.perf_counter() - t0
    nbytes = file_bytes(index, folder)
    name = f"{factory} ({'L2' if metric == faiss.METRIC_L2 else 'IP'})"
    print(f"{name}: built in {build_s:.1f} s, {nbytes / 1e6:.0f} MB", flush=True)

    def fetch(ids: np.ndarray) -> np.ndarray:
        return stored[ids]

    rows = []
    for nprobe in NPROBE:
        faiss.extract_index_ivf(index).nprobe = nprobe
        for rf in RERANK:
            def search(q: np.ndarray, rf: int = rf) -> np.ndarray:
                _, cand = index.search(q[None], rf * K)
                return exact_rerank(q, cand[0], fetch, K)[1]
            p50, recall = measure(search, vectors, queries, truth, kth)
            rows.append({"index": name, "setting": f"nprobe={nprobe} rf={rf}", "p50_ms": round(p50, 3),
                         "recall": round(recall, 4), "build_s": round(build_s, 1), "index_mb": round(nbytes / 1e6, 1)})
            print(rows[-1], flush=True)
    return rows


def hnsw_rows(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, kth: np.ndarray,
              folder: str) -> list[dict[str, Any]]:
    """FAISS HNSW32 over float32 copies (the peer of bench.index), efSearch swept."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = faiss.index_factory(vectors.shape[1], "HNSW32", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.add(vectors)
    build_s = time.perf_counter() - t0
    nbytes = file_bytes(index, folder)
    rows = []
    for ef in EF_SEARCH:
        index.hnsw.efSearch = ef

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q[None], K)[1][0]
        p50, recall = measure(search, vectors, queries, truth, kth)
        rows.append({"index": "HNSW32 (IP)", "setting": f"efSearch={ef}", "p50_ms": round(p50, 3),
                     "recall": round(recall, 4), "build_s": round(build_s, 1), "index_mb": round(nbytes / 1e6, 1)})
        print(rows[-1], flush=True)
    return rows


def fastest(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per index, the fastest setting reaching recall 0.95 and 0.98 (None: never reached)."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["index"] for r in rows):
        sweep = [r for r in rows if r["index"] == name]
        out[name] = {}
        for target in (0.95, 0.98):
            best = matched_setting(sweep, target)
            out[name][str(target)] = None if best is None else {k: best[k] for k in ("setting", "p50_ms", "recall")}
    return out


def main(argv: list[str] | None = None) -> None:
    import tempfile

    p = argparse.ArgumentParser(prog="python -m bench.fastscan", description=__doc__.split("\n")[0])
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=112)
    p.add_argument("--no-peer", action="store_true", help="leave out HNSW32 (its build is the longest)")
    a = p.parse_args(argv)
    stored = held_out_queries(a.vectors, a.dim, 16, seed=7).astype(np.float16)  # the mixture, as the store keeps it
    vectors = stored.astype(np.float32)
    queries = held_out_queries(500, a.dim, 16, seed=99)
    truth, kth = exact_top_k(vectors, queries, K)
    nlist = nlist_for(a.vectors)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for factory, metric in ((f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT),
                                (f"IVF{nlist},PQ{a.dim // 2}x4fs", faiss.METRIC_INNER_PRODUCT),
                                (f"IVF{nlist},PQ{a.dim // 2}x4fs", faiss.METRIC_L2)):
            rows += ivf_rows(factory, metric, vectors, stored, queries, truth, kth, folder)
        if not a.no_peer:
            rows += hnsw_rows(vectors, queries, truth, kth, folder)
    summary = fastest(rows)
    for name, best in summary.items():
        print(name, best)
    report(f"fastscan_d{a.dim}_{a.vectors}", rows, {
        "vectors": a.vectors, "dim": a.dim, "k": K, "queries": 500,
        "held_out": "queries are another seed of the mixture, never added nor in the training sample",
        "latency": "one thread, one query at a time, p50; IVF rows include the exact re-rank of rf*k candidates",
        "fastest_at_recall": summary})


if __name__ == "__main__":
    main()
