"""Query with any image (#15): upload -> vectors ready, the model worker's start, top-k and overlays.

On a real EfficientNet-Lite0 store of scikit-image's demo images (the default model and layers),
a 224-px PNG goes the explorer's way: :class:`hoverlay.explorer.query_worker.QueryWorker` (the
shared validator here, the framed request, decode + forward + float16 normalisation in the
worker, the arrays back). Measured:

- ``worker_start_s``: a cold worker process to its "ready" (interpreter + torch + pipeline
  imports), and ``model_load_s``: the store's model loaded in it (first request's extra);
- ``upload_to_vectors``: submit -> every layer's vectors in the explorer process, warm worker,
  ``--repeats`` sequential uploads (p50 / p90 / max);
- ``first_overlays``: that plus one page's similarity maps in every layer (16 stored images, the
  explorer's :func:`~hoverlay.explorer.kernels.page_similarity`), the centre patch as query;
- ``topk``: :class:`~hoverlay.stores.search.LayerSearch` top-32 for the query vector per layer
  (index + exact re-rank, as the explorer's top-k panel).

    python -m bench.query [--repeats 30] [--threads N] [--workdir DIR]

Writes bench/results/query.json. The demo store is small (15 images): top-k times here are a
lower bound; bench/index.py measures top-k at 10^5-10^7 patches.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from bench.common import report


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def _store(work: str) -> str:
    """The demo store (built once per workdir) with the default model."""
    from hoverlay.pipeline.build import build
    from hoverlay.pipeline.demo import copy_demo_images

    store = os.path.join(work, "demo-query.zarr")
    if not os.path.exists(os.path.join(store, "zarr.json")):
        build(copy_demo_images(os.path.join(work, "images")), store, quiet=True)
    return store


def _upload_png(size: int = 224) -> bytes:
    """A 224-px PNG that is not in the store: chelsea, rotated and cropped."""
    from PIL import Image

    from hoverlay.pipeline.demo import skimage_data_dir

    img = Image.open(os.path.join(skimage_data_dir(), "chelsea.png")).convert("RGB").rotate(10)
    w, h = img.size
    img = img.crop(((w - h) // 2, 0, (w + h) // 2, h)).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def run(work: str, repeats: int, threads: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # everything explorer-side first: the worker must be the only process with torch
    from hoverlay.explorer.kernels import QueryVector, page_block, page_similarity
    from hoverlay.explorer.query_worker import QueryWorker, QueryWorkerConfig
    from hoverlay.stores import open_store
    from hoverlay.stores.search import LayerSearch

    store = _store(work)  # builds in this process when needed (imports torch here, not in serving)
    reader = open_store(store)
    data = _upload_png()
    worker = QueryWorker(QueryWorkerConfig(threads=threads, timeout=300.0))
    load_before = os.getloadavg()[0]
    try:
        t = time.perf_counter()
        hello = worker.start().result(300)
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        loaded = worker.warm(store).result(300)
        load_s = time.perf_counter() - t
        worker.embed(data, store)  # first forward (traces the extractor)
        ready, overlays, worker_side = [], [], []
        page = np.arange(min(16, reader.n_images))
        blocks = {layer: page_block(reader.vectors(layer, page), reader.norms(layer, page))
                  for layer in reader.layers}
        for _ in range(repeats):
            t = time.perf_counter()
            got = worker.submit(data, store).result(300)
            t_ready = time.perf_counter()
            queries = {}
            for layer, emb in got.layers.items():
                h, w = emb.norms.shape
                queries[layer] = QueryVector(emb.vectors[h // 2, w // 2].astype(np.float32),
                                             float(emb.norms[h // 2, w // 2]))
            page_similarity(queries, blocks)
            t_maps = time.perf_counter()
            ready.append(t_ready - t)
            overlays.append(t_maps - t)
            worker_side.append(sum(got.timings.values()))
        rows: list[dict[str, Any]] = [
            {"what": "worker start (cold process -> ready)", "p50_ms": start_s * 1000, "p90_ms": "",
             "max_ms": ""},
            {"what": f"model load in worker ({reader.model.get('spec')})", "p50_ms": load_s * 1000,
             "p90_ms": "", "max_ms": ""},
            {"what": "upload -> vectors ready (224 px, warm)", "p50_ms": _p(ready, 50), "p90_ms": _p(ready, 90),
             "max_ms": max(ready) * 1000},
            {"what": "  of which in the worker (decode+forward)", "p50_ms": _p(worker_side, 50),
             "p90_ms": _p(worker_side, 90), "max_ms": max(worker_side) * 1000},
            {"what": f"upload -> first overlays ({len(page)}-image page, all layers)",
             "p50_ms": _p(overlays, 50), "p90_ms": _p(overlays, 90), "max_ms": max(overlays) * 1000},
        ]
        for layer in reader.layers:
            search = LayerSearch(reader, layer)
            emb = got.layers[layer]
            h, w = emb.norms.shape
            q = emb.vectors[h // 2, w // 2].astype(np.float32)
            search.search(q, 32)
            times = []
            for _ in range(max(repeats, 20)):
                t = time.perf_counter()
                top = search.search(q, 32)
                times.append(time.perf_counter() - t)
            rows.append({"what": f"top-32 {layer} ({top.method})", "p50_ms": _p(times, 50),
                         "p90_ms": _p(times, 90), "max_ms": max(times) * 1000})
        extra = {"store_images": reader.n_images, "layers": reader.layers, "repeats": repeats,
                 "upload_bytes": len(data), "worker_threads": hello.get("threads"),
                 "worker_import_s": hello.get("import_seconds"), "model_load_s": loaded.get("load_seconds"),
                 "upload_to_vectors_p50_ms": _p(ready, 50), "first_overlays_p50_ms": _p(overlays, 50),
                 "worker_start_s": start_s, "mean_ready_ms": statistics.mean(ready) * 1000,
                 # a shared machine's other work shows here: quote numbers with it
                 "load_average_1m_before_after": [load_before, os.getloadavg()[0]]}
        return rows, extra
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=30, help="timed uploads (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the worker (default torch's)")
    p.add_argument("--workdir", default=None, help="keep the demo store here between runs")
    a = p.parse_args(argv)
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)
        rows, extra = run(a.workdir, a.repeats, a.threads)
    else:
        with tempfile.TemporaryDirectory() as work:
            rows, extra = run(work, a.repeats, a.threads)
    report("query", rows, extra)


if __name__ == "__main__":
    main()
