"""How much of an HNSW graph's recall is the luck of its build: one dataset, several insertion orders.

    python -m bench.graph_orders [--vectors 200000] [--dim 112] [--orders 5] [--ef-construction 40 80]

Why: ``bench.index`` compares hoverlay's ``IDMap,HNSW32_SQfp16`` graph with FAISS's ``HNSW32``
built on the same vectors, and at 1M x 112 the two graphs' recall at the same efSearch differed
by ~0.005 although the algorithm, M, efConstruction and the vector values are the same (the
stored vectors are fp16; the peer holds their float32 copies). This benchmark builds the same
graph over the same synthetic vectors (``bench.index``'s clustered mixture) inserted in
different orders — the store's own order first, then random permutations — and reports
recall@32 of 500 held-out queries (another seed of the mixture, never inserted) at each
efSearch, tie-aware against a float64 exact scan. The spread across orders is what a
matched-recall comparison of two single builds cannot tell apart from a real difference.
Results: ``bench/results/graph-orders.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import faiss
import numpy as np

from bench.common import report
from bench.index import held_out_queries
from hoverlay.stores.index import recall_per_query

EF_SEARCH = (16, 32, 48, 64, 128, 256)
K = 32


def order_recalls(vectors: np.ndarray, queries: np.ndarray, orders: int, ef_construction: int,
                  factory: str = "HNSW32_SQfp16") -> list[dict[str, Any]]:
    """One row per insertion order: build seconds and recall@K at each of :data:`EF_SEARCH`."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    truth = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    kth = np.take_along_axis(scores, truth, axis=1).min(axis=1)
    rows = []
    for order in range(orders):
        perm = np.arange(len(vectors)) if order == 0 else np.random.default_rng(order).permutation(len(vectors))
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        t0 = time.perf_counter()
        index.add(vectors[perm])
        build_s = time.perf_counter() - t0
        row: dict[str, Any] = {"order": "store" if order == 0 else f"shuffled {order}",
                               "ef_construction": ef_construction, "build_s": round(build_s, 1)}
        for ef in EF_SEARCH:
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
            _, found = index.search(queries, K)
            ids = np.where(found >= 0, perm[np.maximum(found, 0)], -1)
            found_scores = np.take_along_axis(scores, np.maximum(ids, 0), axis=1)
            row[f"recall@ef{ef}"] = round(float(recall_per_query(ids, truth, found_scores, kth).mean()), 4)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.graph_orders", description=__doc__.split("\n")[0])
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=112)
    p.add_argument("--orders", type=int, default=5, help="the store's order, then this many - 1 shuffles")
    p.add_argument("--ef-construction", type=int, nargs="+", default=[40, 80])
    p.add_argument("--name", default="graph-orders")
    a = p.parse_args(argv)
    vectors = held_out_queries(a.vectors, a.dim, 16, seed=7)  # the mixture bench.index stores
    queries = held_out_queries(500, a.dim, 16, seed=99)
    rows = [row for efc in a.ef_construction for row in order_recalls(vectors, queries, a.orders, efc)]
    spread = {f"efC{efc}": {f"ef{ef}": [min(r[f"recall@ef{ef}"] for r in rows if r["ef_construction"] == efc),
                                         max(r[f"recall@ef{ef}"] for r in rows if r["ef_construction"] == efc)]
                             for ef in EF_SEARCH} for efc in a.ef_construction}
    report(a.name, rows, {"vectors": a.vectors, "dim": a.dim, "k": K, "queries": 500,
                          "held_out": "queries are another seed of the mixture, never inserted",
                          "factory": "HNSW32_SQfp16, inner product", "spread_min_max": spread})


if __name__ == "__main__":
    main()
