"""Query with any image, in Chromium (#15): upload -> the query tile and overlays drawn, -> top-k shown.

A real server (``--query-worker-start``) on the EfficientNet-Lite0 demo store (``bench.query``'s),
one page in headless Chromium. Per repeat a 224-px PNG not in the store goes in through the
page's file input; timed from ``set_input_files``:

- ``shown``: the query tile's image is in the browser (the worker embedded it, the server sent it);
- then the pointer goes to the tile's centre patch, timed from that move:
  ``overlays``: the main grid's overlays changed (the browser drew the upload's maps), as seen
  from this process (Playwright's round trips included),
  ``painted``: in the browser, from the move's event to the animation frame showing the grid's
  new maps (``performance.now()``; on the browser path no server is involved),
  ``topk``: the top-k heading names the upload (the rest, the search and the cards).

The first upload (model load in the worker) is reported apart; the worker's start is the
server's log line. Warm p50 over ``--repeats`` uploads (each a slightly other rotation).

    python -m bench.query_browser [--repeats 8] [--threads 1] [--workdir DIR]

Writes bench/results/query-browser.json.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import report
from bench.servers import serve_explorer

CHROMIUM = os.environ.get("HOVERLAY_CHROMIUM", "/usr/bin/chromium")


def _png(angle: float) -> bytes:
    from PIL import Image

    from hoverlay.pipeline.demo import skimage_data_dir

    img = Image.open(os.path.join(skimage_data_dir(), "chelsea.png")).convert("RGB").rotate(angle)
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).resize((224, 224))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _one(page: Any, data: bytes, name: str) -> dict[str, float]:
    t0 = time.perf_counter()
    page.locator("input[type=file]").first.set_input_files(files=[{"name": name, "mimeType": "image/png",
                                                                   "buffer": data}])
    page.get_by_text(f"{name}: hover it to query").wait_for()
    page.wait_for_function("""() => Bokeh.index.query_one(v => (v.model.name || '').startsWith('upload:')) !== null""")
    shown = time.perf_counter() - t0
    before = page.evaluate("window.hoverlay_updates || 0")
    box = page.evaluate("""() => { const v = Bokeh.index.query_one(v => (v.model.name || '').startsWith('upload:'));
        const r = v.el.getBoundingClientRect(); return [r.left + v.frame.bbox.hcenter, r.top + v.frame.bbox.vcenter]; }""")
    page.mouse.move(0, 0)
    t1 = time.perf_counter()
    page.mouse.move(box[0], box[1])
    page.wait_for_function("(n) => (window.hoverlay_updates || 0) > n", arg=before)
    overlays = time.perf_counter() - t1
    # in the browser: the move's event -> the animation frame that shows the grid's new maps
    page.wait_for_function("""() => { const p = window.hoverlay_paint_times || {};
        return Object.keys(p).some(k => k.startsWith('grid-overlay:') && p[k] >= window.hoverlay_last_move); }""")
    painted = page.evaluate("""() => { const p = window.hoverlay_paint_times;
        return Math.max(...Object.keys(p).filter(k => k.startsWith('grid-overlay:')).map(k => p[k]))
               - window.hoverlay_last_move; }""") / 1000
    page.get_by_text(re.compile(f"closest to the upload {re.escape(name)}")).first.wait_for()
    topk = time.perf_counter() - t1
    return {"shown": shown, "overlays": overlays, "painted": painted, "topk": topk}


def main(repeats: int = 8, workdir: str | None = None, threads: int = 1) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from bench.query import _store

    work = workdir or tempfile.mkdtemp(prefix="hoverlay-query-browser-")
    store = _store(work)
    logs = Path(work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = serve_explorer([store], "--query-worker-start", "--query-threads", str(threads), log_dir=logs,
                            timeout=120)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.set_default_timeout(180_000)
            page.goto(server.url)
            page.wait_for_function("""() => window.Bokeh && Bokeh.documents.length > 0
                && Bokeh.documents[0].get_model_by_name('grid-rgb') !== null""")
            first = _one(page, _png(7.0), "first.png")  # the worker loads the store's model
            runs = [_one(page, _png(8.0 + i), f"q{i}.png") for i in range(repeats)]
            browser.close()
        log = server.log()
    finally:
        server.stop()
    started = re.search(r"query worker \d+ ready in ([\d.]+) s", log)
    rows = [{"measure": m, "first_s": round(first[m], 3),
             "p50_ms": round(1000 * statistics.median(r[m] for r in runs), 1),
             "max_ms": round(1000 * max(r[m] for r in runs), 1)} for m in ("shown", "overlays", "painted", "topk")]
    result = {"store": "EfficientNet-Lite0 demo store (15 images)", "image": "224-px PNG (chelsea, rotated)",
              "repeats": repeats, "worker_threads": threads, "worker_start_s": float(started.group(1)) if started else None,
              "load": os.getloadavg()}
    report("query-browser", rows, result)
    return {"rows": rows, **result}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model worker (default 1)")
    a = ap.parse_args()
    main(repeats=a.repeats, workdir=a.workdir, threads=a.threads)
