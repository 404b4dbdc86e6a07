"""P2, P3 and top-k latency for the explorer's hover path.

P2: server work per hover for a page of 16 images x 3 layers (28x28x40, 14x14x112, 7x7x320),
    at several store sizes: the engine's matmuls alone (uncached queries) and the whole pointer
    handler (engine + Bokeh source updates + serialising the PATCH-DOC message). Target <= 5 ms
    p50, flat in N.
P3: pointer-move -> overlay data change -> next animation frame in Chromium on localhost, over
    ``--moves`` moves to new patches. Target <= 50 ms p50.
Top-k: LayerSearch (index or exact scan) for k=32, and the app's top-k work (k=8 incl. crops).

    python -m bench.hover [--sizes 1000,10000] [--moves 200] [--stores DIR] [--no-browser]

Stores are synthetic (``hoverlay.stores.synthetic`` vectors written through the public writer); blocks of
activations are reused beyond the first few thousand images so that a 100k store takes minutes,
which does not matter for these measurements (the hover path never reads outside the page).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import numpy as np

from bench.common import report

LAYERS = {"l28": (28, 28, 40), "l14": (14, 14, 112), "l7": (7, 7, 320)}
#: The default model's layer geometry by name: v1 the old signed defaults (_blocks.4.add,
#: _blocks.10.add, _blocks.15._bn2), v2 the non-negative ones (_blocks.5._swish,
#: _blocks.11._swish, _swish_1). Benchmarks choose one with --geometry; LAYERS is v1 unless set.
GEOMETRIES = {"v1": dict(LAYERS), "v2": {"l28": (28, 28, 240), "l14": (14, 14, 672), "l7": (7, 7, 1280)}}


def use_geometry(name: str) -> None:
    """Make ``LAYERS`` (shared by the benches that import it) one of :data:`GEOMETRIES`."""
    LAYERS.clear()
    LAYERS.update(GEOMETRIES[name])
IMAGE_SIZE = 224
PAGE = 16
DISTINCT_BLOCKS = 8  # blocks of 256 images with their own random activations; then reused


def make_store(url: str, n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> str:
    """A committed synthetic store of n images with the default model's layer geometry."""
    from hoverlay.stores import LayerGeometry, open_store
    from hoverlay.stores.synthetic import clustered_activations, synthetic_pixels
    from hoverlay.stores.writer import create_store

    if os.path.exists(url):
        try:
            if open_store(url).n_images == n:
                return url
        except Exception:
            pass
    layers = {k: LayerGeometry(*v) for k, v in LAYERS.items()}
    writer = create_store(url, model={"spec": "synthetic-bench"}, preprocessing={"kind": "synthetic"},
                          image_size=image_size, layers=layers, chunk=16, overwrite=True)
    rng = np.random.default_rng(seed)
    start = writer.reserve(n)
    block = 256
    cache: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    for b, lo in enumerate(range(0, n, block)):
        hi = min(n, lo + block)
        if b < DISTINCT_BLOCKS:
            pix = synthetic_pixels(rng, block, image_size)
            acts = {k: clustered_activations(rng, (block, *g)) for k, g in LAYERS.items()}
            cache.append((pix, acts))
        pix, acts = cache[b % len(cache)]
        writer.write_block(start + lo, pix[:hi - lo], {k: a[:hi - lo] for k, a in acts.items()})
        writer.write_table(start + lo, [{"source": f"bench://{i}", "label": "abc"[i % 3], "hash": f"b{i}"}
                                        for i in range(lo, hi)])
    writer.commit(start + n)
    return url


def build_index(url: str, layer: str, max_train: int = 30_000, max_nlist: int = 1024) -> dict[str, Any]:
    """An index for one layer, chosen by size like the pipeline does, timed.

    IVF lists are capped at ``max_nlist`` and training at ``max_train`` vectors so that a 10k
    store's index builds in about a minute on 2 cores; the explorer re-ranks exactly either way.
    """
    from hoverlay.stores import PatchIndex, choose_factory, open_store
    from hoverlay.stores.index import nlist_for
    from hoverlay.stores.search import iter_vector_blocks

    reader = open_store(url)
    g = reader.geometry(layer)
    n_vec = reader.n_images * g.patches_per_image
    factory = choose_factory(n_vec, g.dim)
    if factory.startswith("IVF"):  # fp16 codes: exact like Flat (stored vectors are fp16), half the bytes
        factory = f"IVF{min(nlist_for(n_vec), max_nlist)},SQfp16"
    t0 = time.perf_counter()
    index = PatchIndex.create(g.dim, factory)
    if not index.is_trained:
        need = max_train
        step = max(1, reader.n_images // max(1, need // g.patches_per_image))
        sample = reader.vectors(layer, np.arange(0, reader.n_images, step)).reshape(-1, g.dim)
        index.train(sample[:need].astype(np.float32))
    for ids, vecs in iter_vector_blocks(reader, layer, images_per_block=512):
        index.add(vecs.astype(np.float32), ids)
    index.meta.images_indexed = reader.n_images
    index.save(url, layer)
    return {"factory": factory, "vectors": n_vec, "build_s": time.perf_counter() - t0,
            "index_bytes": os.path.getsize(os.path.join(url, "index", f"{layer}.faiss"))}


def _pct(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bench_server(url: str, hovers: int = 300, seed: int = 1) -> dict[str, Any]:
    """Per-hover server work for a page of 16 images x 3 layers."""
    from bokeh.document import Document
    from bokeh.protocol import Protocol

    from hoverlay.explorer.app import create_app
    from hoverlay.explorer.engine import OverlayEngine, Query
    from hoverlay.explorer.resources import get_reader

    reader = get_reader(url)
    rng = np.random.default_rng(seed)
    page_ids = np.sort(rng.choice(reader.n_images, PAGE, replace=False))
    h, w, _ = LAYERS["l28"]
    queries = [Query(int(page_ids[rng.integers(PAGE)]), int(rng.integers(h)), int(rng.integers(w)), "l28")
               for _ in range(hovers)]

    engine = OverlayEngine(reader, list(LAYERS))
    t0 = time.perf_counter()
    engine.set_page(page_ids)
    engine.page_maps(queries[0])
    page_change = time.perf_counter() - t0
    engine._memo.size = 0  # measure the matmuls, not the memo
    compute = []
    for q in queries:
        t = time.perf_counter()
        engine.page_maps(q)
        compute.append(time.perf_counter() - t)

    layout = create_app(url, page_size=PAGE, live_topk=False)
    app = layout.app
    # In a server session the layer view and top-k wait for the pointer to rest (a timer); here
    # there is no server loop, so keep them out of the hover measurement and time them apart.
    app.grid._after_rest = lambda: None
    doc = Document()
    doc.add_root(layout.get_root(doc))
    protocol = Protocol()
    handler, serialise, nbytes = [], [], []
    for i, q in enumerate(queries):
        tile = i % PAGE
        doc.hold("combine")
        t = time.perf_counter()
        app.grid._on_pointer("data", None, {"tile": [tile], "y": [q.y], "x": [q.x], "click": [0]})
        t1 = time.perf_counter()
        events = list(doc.callbacks._held_events)
        msg = protocol.create("PATCH-DOC", events)
        t2 = time.perf_counter()
        doc.callbacks._held_events = []
        doc.unhold()
        handler.append(t1 - t)
        serialise.append(t2 - t1)
        nbytes.append(len(msg.content_json) + sum(len(b.to_bytes()) for b in msg._buffers))
    rest = []
    for q in queries[:50]:  # the layer view update once the pointer rests on a new image
        app.state.current = q
        app.query_view._image = -1
        t = time.perf_counter()
        app.grid._on_rest()
        rest.append(time.perf_counter() - t)
    hit = []
    for _ in range(50):  # hovering back over the last patch: memo hit
        t = time.perf_counter()
        app.grid._on_pointer("data", None, {"tile": [tile], "y": [q.y], "x": [q.x + 0], "click": [0]})
        hit.append(time.perf_counter() - t)
    c50, c99 = _pct(compute)
    h50, h99 = _pct([a + b for a, b in zip(handler, serialise, strict=True)])
    return {"compute_p50_ms": c50 * 1e3, "compute_p99_ms": c99 * 1e3,
            "hover_p50_ms": h50 * 1e3, "hover_p99_ms": h99 * 1e3,
            "serialise_p50_ms": _pct(serialise)[0] * 1e3, "same_patch_p50_ms": _pct(hit)[0] * 1e3,
            "message_kb": float(np.median(nbytes)) / 1e3, "page_change_ms": page_change * 1e3,
            "rest_layer_view_p50_ms": _pct(rest)[0] * 1e3}


def bench_topk(url: str, layer: str, repeats: int = 30, seed: int = 2) -> dict[str, Any]:
    from hoverlay.explorer.engine import OverlayEngine, Query
    from hoverlay.explorer.kernels import QueryVector
    from hoverlay.explorer.topk import card_data, crop_jpeg, search_hits
    from hoverlay.stores import open_store
    from hoverlay.stores.search import LayerSearch

    reader = open_store(url)
    search = LayerSearch(reader, layer)
    engine = OverlayEngine(reader, [layer])
    g = reader.geometry(layer)
    rng = np.random.default_rng(seed)
    times32, times_app = [], []
    for _ in range(repeats):
        q = Query(int(rng.integers(reader.n_images)), int(rng.integers(g.height)), int(rng.integers(g.width)), layer)
        qv: QueryVector = engine.query_vectors(q)[layer]
        t = time.perf_counter()
        top = search.search(qv.unit, 32)
        times32.append(time.perf_counter() - t)
        t = time.perf_counter()
        hits, _ = search_hits(search, qv, 8)
        [card_data(h, crop_jpeg(reader, layer, h)) for h in hits]
        times_app.append(time.perf_counter() - t)
        if len(times32) >= 5 and sum(times32) > 20:  # exact scans of big stores: enough samples
            break
    s50, s99 = _pct(times32)
    a50, a99 = _pct(times_app)
    recall = 1.0
    if search.index is not None and not (search.index.stores_exact_vectors and search.index.nlist is None):
        from hoverlay.pipeline.indexing import measure_recall

        recall = measure_recall(reader, layer, search.index, k=32, n_queries=50, seed=9)
    return {"layer": layer, "search": "index" if search.index is not None else "exact scan", "recall@32": recall,
            "factory": (search.index.meta.factory if search.index is not None else "-"),
            "top32_p50_ms": s50 * 1e3, "top32_p99_ms": s99 * 1e3,
            "app_top8_p50_ms": a50 * 1e3, "app_top8_p99_ms": a99 * 1e3, "exact": bool(top.exact)}


def bench_explorer_memory(url: str, layer: str, hovers: int = 60, seed: int = 4) -> dict[str, Any]:
    """P6: memory of a serving explorer process after one session hovered and searched top-k.

    ``rss_anon`` is the process's own memory (heap, arrays); the index and the re-rank file are
    memory-mapped, so their pages count in ``rss`` but belong to the shared page cache.
    """
    import asyncio

    from bench.servers import serve_explorer
    from bench.wsclient import BokehSession

    g = LAYERS[layer]
    with tempfile.TemporaryDirectory() as logs:
        server = serve_explorer([url], "--page-size", str(PAGE), "--tile-px", "110", "--browser-hover-budget", "0",
                                log_dir=logs)
        try:
            async def session() -> int:
                s = await BokehSession.open(server.url, f"?layer={layer}")
                rng = np.random.default_rng(seed)
                try:
                    for _ in range(hovers):
                        await s.hover(int(rng.integers(PAGE)), int(rng.integers(g[0])), int(rng.integers(g[1])),
                                      timeout=60)
                    await asyncio.sleep(1.5)  # the pointer rests: layer view and top-k
                    await s.wait_for(lambda: "patches of the store closest to" in s.texts(), 120)
                finally:
                    await s.close()
                return hovers

            asyncio.run(session())
            status = _proc_status(server.proc.pid)
        finally:
            server.stop()
    return {"layer": layer, "hovers": hovers, "rss_MB": status["VmRSS"] / 1e3, "peak_rss_MB": status["VmHWM"] / 1e3,
            "rss_anon_MB": status["RssAnon"] / 1e3, "rss_file_MB": status["RssFile"] / 1e3}


def _proc_status(pid: int) -> dict[str, int]:
    """kB figures from /proc/<pid>/status (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


def bench_browser(url: str, moves: int = 200, seed: int = 3, live_topk: bool = False) -> dict[str, Any]:
    """Pointer-move -> data change / next frame in headless Chromium against a served app."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "hoverlay.explorer.serve", url, "--port", str(port),
                             "--page-size", str(PAGE), "--tile-px", "110",
                             *([] if live_topk else ["--no-live-topk"])], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                break
            except OSError:
                time.sleep(0.3)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=os.environ.get("HOVERLAY_CHROMIUM", "/usr/bin/chromium"),
                                         headless=True)
            page = browser.new_page(viewport={"width": 2100, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("""() => window.Bokeh && Bokeh.documents.length > 0
                && Bokeh.index.query_one(v => v.model.name === 'grid:l28') != null
                && Bokeh.documents[0].get_model_by_name('grid-rgb').data.image.length > 0""", timeout=60_000)
            rng = np.random.default_rng(seed)
            sources = [f"grid-overlay:{name}" for name in LAYERS]
            data_lat, paint_lat = [], []
            last = None
            for i in range(moves + 5):
                tile, y, x = int(rng.integers(PAGE)), int(rng.integers(28)), int(rng.integers(28))
                if (tile, y, x) == last:
                    continue
                last = (tile, y, x)
                sx, sy = page.evaluate("""([tile, fx, fy]) => {
                    const pv = Bokeh.index.query_one(v => v.model.name === 'grid:l28');
                    const rgb = Bokeh.documents[0].get_model_by_name('grid-rgb').data;
                    const r = pv.el.getBoundingClientRect(), s = rgb.dw[tile];
                    return [r.left + pv.frame.x_scale.compute(rgb['x:l28'][tile] + fx * s),
                            r.top + pv.frame.y_scale.compute(rgb['y:l28'][tile] + s - fy * s)];
                }""", [tile, (x + 0.5) / 28, (y + 0.5) / 28])
                page.mouse.move(sx, sy, steps=1)
                page.wait_for_function("""(names) => {
                    const t0 = window.hoverlay_last_move, u = window.hoverlay_update_times || {},
                          p = window.hoverlay_paint_times || {};
                    return t0 !== undefined && names.every(n => u[n] > t0 && p[n] > t0);
                }""", arg=sources, timeout=10_000, polling="raf")
                t0, upd, paint = page.evaluate("""(names) => [window.hoverlay_last_move,
                    Math.max(...names.map(n => window.hoverlay_update_times[n])),
                    Math.max(...names.map(n => window.hoverlay_paint_times[n]))]""", sources)
                if i >= 5:  # warm-up moves excluded
                    data_lat.append(upd - t0)
                    paint_lat.append(paint - t0)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    d50, d99 = _pct(data_lat)
    p50, p99 = _pct(paint_lat)
    return {"live_topk": live_topk, "moves": len(data_lat), "data_p50_ms": d50, "data_p99_ms": d99,
            "frame_p50_ms": p50, "frame_p99_ms": p99}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.hover", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="store sizes (images), comma-separated")
    parser.add_argument("--moves", type=int, default=200, help="pointer moves in Chromium")
    parser.add_argument("--hovers", type=int, default=300, help="server-side hovers per size")
    parser.add_argument("--stores", default=None, help="folder to keep the synthetic stores in")
    parser.add_argument("--index-layer", default="l7", help="layer to build a FAISS index for")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--large-image-size", type=int, default=32,
                        help="pixels of the synthetic images in stores of 50k images or more (faster to "
                             "make; the hover path never reads pixels; default 32)")
    args = parser.parse_args(argv)
    folder = args.stores or tempfile.mkdtemp(prefix="hoverlay-bench-")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    server_rows, topk_rows, setup, memory_rows = [], [], [], []
    for n in sizes:
        url = os.path.join(folder, f"store-{n}")
        t0 = time.perf_counter()
        make_store(url, n, image_size=IMAGE_SIZE if n < 50_000 else args.large_image_size)
        made = time.perf_counter() - t0
        idx = build_index(url, args.index_layer)
        setup.append({"images": n, "store_s": made, **idx})
        server_rows.append({"images": n, **bench_server(url, args.hovers)})
        topk_rows.append({"images": n, **bench_topk(url, args.index_layer)})
        memory_rows.append({"images": n, "index_MB": idx["index_bytes"] / 1e6,
                            **bench_explorer_memory(url, args.index_layer)})
        if n == sizes[0]:  # exact scan of the finest layer (no index): the fallback's cost
            topk_rows.append({"images": n, **bench_topk(url, "l28", repeats=5)})
    report("hover-setup", setup)
    report("hover-topk", topk_rows)
    report("explorer-memory", memory_rows, {"note": "P6: one server process after a session of hovers + top-k"})
    browser_rows = []
    if not args.no_browser:
        first = os.path.join(folder, f"store-{sizes[0]}")
        for live in (False, True):  # the hover path alone; with top-k searches after every rest
            browser_rows.append({"images": sizes[0], **bench_browser(first, args.moves, live_topk=live)})
        report("hover-browser", browser_rows)
    path = report("hover", server_rows, extra={"topk": topk_rows, "browser": browser_rows, "setup": setup,
                                              "page": PAGE, "layers": LAYERS})
    print(f"\nwrote {path}")
    return {"server": server_rows, "topk": topk_rows, "browser": browser_rows}


if __name__ == "__main__":
    main(sys.argv[1:])
