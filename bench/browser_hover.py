"""The hover computed in the browser against the server path, measured in one run.

    python -m bench.browser_hover [--images 1000] [--moves 150] [--sessions 1 20 50]

For each path (``browser``: the default; ``server``: the same server with
``--browser-hover-budget 0``, i.e. the previous design, the peer configuration) and each number of
concurrent sessions, one server process serves a synthetic store with the default model's layer
geometry (16 images x 3 layers: 28x28x40, 14x14x112, 7x7x320 per page). One real Chromium page
measures pointer move -> repainted overlays: ``performance.now()`` of the native ``mousemove``
(a capture listener on the document, before Bokeh sees it) to the animation frame after the new
maps were written (browser path) or arrived (server path), i.e. the end of Bokeh's paint of the
last of the three figures after that (the page is instrumented to record it). The other sessions are Bokeh-protocol
clients (:mod:`bench.wsclient`) sending exactly what a page on that path sends: on the server path
every patch change, on the browser path one row per rest. Every rest must be answered by a top-k
for that patch. Reported: p50/p99 pointer->paint, server CPU seconds per pointer move (all
sessions' moves), rests answered, server errors, and bytes a page open and a page switch receive;
page open and page switch p50, each to the page shown (images and captions painted) and, on the
browser path, to the page hoverable (its vectors arrived: they follow the page in a message of
their own), and page open with the scripts cached (a second tab). Results:
``bench/results/browser-hover.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import threading
import time
from typing import Any

import numpy as np

from bench.common import report
from bench.hover import GEOMETRIES, LAYERS, PAGE, build_index, make_store, use_geometry
from bench.servers import serve_explorer
from bench.serving import cpu_seconds
from bench.wsclient import BokehSession

CHROMIUM = os.environ.get("HOVERLAY_CHROMIUM", "/usr/bin/chromium")
SNAP = "l28"
MOVE_RATE = 15.0  # patch changes per second of a background user while moving
STROKE = 15  # moves per stroke, then a rest
REST_S = 0.6
ANSWER_S = 10.0  # a rest counts as answered when its top-k arrives within this

#: Every grid figure's tiles are decoded and drawn: they are JPEG data URIs that an ``ImageURL``
#: glyph loads asynchronously once their data arrived (a loader per tile until it has loaded).
TILES_LOADED = """(() => { const views = [...Bokeh.index.query(v => typeof v.model.name === 'string'
                                                             && v.model.name.startsWith('grid:'))];
    return views.length > 0 && views.every(pv => [...pv.renderer_views.values()].some(rv =>
        rv.glyph !== undefined && rv.glyph.loaders !== undefined && rv.glyph.image.length > 0
        && rv.glyph.loaders.every(l => l === null))); })()"""

PAGE_READY = f"""() => window.Bokeh && Bokeh.documents.length > 0
    && Bokeh.index.query_one(v => v.model.name === 'grid:{SNAP}') != null
    && Bokeh.documents[0].get_model_by_name('grid-rgb').data.image.length > 0 && {TILES_LOADED}"""


def _pct(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


# ------------------------------------------------------------------ background sessions
class Background:
    """``n`` hovering websocket sessions in a thread of their own until :meth:`stop`."""

    def __init__(self, url: str, n: int, browser_path: bool):
        self.url, self.n, self.browser_path = url, n, browser_path
        self.moves = self.rests = self.answered = self.failures = 0
        self.latencies: list[float] = []  # seconds from each answered rest to its top-k
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._go = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self, timeout: float = 180) -> Background:
        self._thread.start()
        self._ready.wait(timeout)
        return self

    def go(self) -> None:
        """Start hovering (after the sessions' own start-up work has settled)."""
        self._go.set()

    def stop(self) -> None:
        self._go.set()
        self._stop.set()
        self._thread.join(120)

    async def _main(self) -> None:
        sessions: list[BokehSession] = []
        try:
            for _ in range(self.n):
                sessions.append(await BokehSession.open(self.url))
        except Exception:
            self.failures += 1
        self._ready.set()
        try:
            await asyncio.gather(*(self._user(i, s) for i, s in enumerate(sessions)))
        finally:
            await asyncio.gather(*(s.close() for s in sessions))

    async def _user(self, seed: int, s: BokehSession) -> None:
        rng = random.Random(seed)
        h, w = LAYERS[SNAP][:2]
        while not self._go.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(rng.uniform(0, 1.0))
        while not self._stop.is_set():
            cell = (0, 0, 0)
            for _ in range(STROKE):
                cell = (rng.randrange(PAGE), rng.randrange(h), rng.randrange(w))
                self.moves += 1
                if not self.browser_path:
                    s.pointer(*cell)
                await asyncio.sleep(1 / MOVE_RATE)
            if self.browser_path:  # the one message of a stroke on the browser path
                s.pointer(*cell, drawn=1)
            self.rests += 1
            rested = time.perf_counter()
            image = s.page_image_ids()[cell[0]]
            want = f"#{image} ({cell[1]},{cell[2]})"
            try:
                await s.wait_for(lambda want=want: want in s.texts(), ANSWER_S)
                self.answered += 1
                self.latencies.append(time.perf_counter() - rested)
            except (asyncio.TimeoutError, ConnectionError):
                pass
            await asyncio.sleep(REST_S)


def settle(pid: int, quiet_s: float = 0.15, step_s: float = 0.5, limit_s: float = 30.0) -> None:
    """Wait until the server used less than ``quiet_s`` CPU seconds in a ``step_s`` interval."""
    deadline = time.perf_counter() + limit_s
    last = cpu_seconds(pid)
    while time.perf_counter() < deadline:
        time.sleep(step_s)
        now = cpu_seconds(pid)
        if now - last < quiet_s:
            return
        last = now


# ----------------------------------------------------------------------- the real page
def _tile_point(page: Any, tile: int, y: int, x: int) -> tuple[float, float]:
    h, w = LAYERS[SNAP][:2]
    return page.evaluate(f"""([tile, fx, fy]) => {{
        const pv = Bokeh.index.query_one(v => v.model.name === 'grid:{SNAP}');
        const rgb = Bokeh.documents[0].get_model_by_name('grid-rgb').data;
        const r = pv.el.getBoundingClientRect(), s = rgb.dw[tile];
        return [r.left + pv.frame.x_scale.compute(rgb['x:{SNAP}'][tile] + fx * s),
                r.top + pv.frame.y_scale.compute(rgb['y:{SNAP}'][tile] + s - fy * s)];
    }}""", [tile, (x + 0.5) / w, (y + 0.5) / h])


def measure_moves(page: Any, moves: int, seed: int) -> list[float]:
    """Pointer -> repainted overlays (ms) for ``moves`` moves to new patches (5 warm-up moves)."""
    names = [f"grid:{name}" for name in LAYERS]
    # Instrumentation of this page only: when each grid figure's canvas was last painted by Bokeh
    # (the end of its paint; the browser presents that frame next), and the native pointer event.
    page.evaluate("""(names) => {
        document.addEventListener('pointermove', () => { window.__move_t = performance.now(); }, {capture: true});
        window.__painted = {};
        for (const name of names) {
            const pv = Bokeh.index.query_one(v => v.model.name === name);
            const paint = pv._actual_paint.bind(pv);
            pv._actual_paint = () => { paint(); window.__painted[name] = performance.now(); };
        }
    }""", names)
    rng = np.random.default_rng(seed)
    h, w = LAYERS[SNAP][:2]
    out, last = [], None
    for i in range(moves + 5):
        cell = (int(rng.integers(PAGE)), int(rng.integers(h)), int(rng.integers(w)))
        if cell == last:
            continue
        last = cell
        sx, sy = _tile_point(page, *cell)
        page.mouse.move(sx, sy, steps=1)
        page.wait_for_function("""(names) => {
            const t0 = window.__move_t, u = window.hoverlay_update_times || {}, p = window.__painted;
            return t0 !== undefined && Object.values(u).length > 0 && Math.max(...Object.values(u)) > t0
                   && names.every(n => p[n] > Math.max(...Object.values(u)));
        }""", arg=names, timeout=30_000, polling="raf")
        lat = page.evaluate("(names) => Math.max(...names.map(n => window.__painted[n])) - window.__move_t", names)
        if i >= 5:
            out.append(float(lat))
    return out


#: The page shown is hoverable on the browser path: every grid layer holds the vectors of the
#: page its config names, in the slot it names (they come in a message after the page's images,
#: or were sent ahead).
PAGE_HOVERABLE = """() => {
    if (!(window.Bokeh && Bokeh.documents.length > 0)) return false;
    const d = Bokeh.documents[0], m = d.get_model_by_name('grid-config');
    if (m === null || m.data.page === undefined || !m.data.fig.length) return false;
    const cfg = m.data, slot = cfg.slot !== undefined && cfg.slot[0] === 1 ? 'grid-vectors-1:' : 'grid-vectors:';
    return cfg.fig.every(l => { const v = d.get_model_by_name(slot + l).data;
                               return v.page[0] === cfg.page[0] && v.v[0].length > 0; }); }"""


def open_and_switch(browser: Any, url: str, repeats: int, browser_path: bool) -> dict[str, Any]:
    """Page open (goto -> grid shown, and -> hoverable) in a new browser context (nothing cached)
    and in a second tab of it (scripts cached, as for a returning user); page switch (next -> new
    page painted, and -> hoverable): the first of a session, then two more (their pages were read
    ahead); p50 of each, and the bytes an open and a switch receive."""
    times: dict[str, list[float]] = {k: [] for k in ("open", "open_hoverable", "open_cached", "switch",
                                                     "switch_hoverable", "switch_next", "switch_next_hoverable")}
    open_bytes, switch_bytes = [], []

    def since(t0: float) -> float:
        return (time.perf_counter() - t0) * 1000

    def hoverable(page: Any, key: str, t0: float) -> None:
        if browser_path:
            page.wait_for_function(PAGE_HOVERABLE, timeout=60_000, polling="raf")
            times[key].append(since(t0))

    for _ in range(repeats):
        ctx = browser.new_context(viewport={"width": 1600, "height": 1300})
        page = ctx.new_page()
        received: list[int] = []
        page.on("websocket", lambda ws, received=received: ws.on(
            "framereceived", lambda p: received.append(len(p))))
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_function(PAGE_READY, timeout=60_000, polling="raf")
        times["open"].append(since(t0))
        hoverable(page, "open_hoverable", t0)
        page.wait_for_timeout(800)
        open_bytes.append(sum(received))
        received.clear()
        for k in range(3):  # the first switch reads the page; later ones find it read ahead
            key = "switch" if k == 0 else "switch_next"
            first = page.evaluate("Bokeh.documents[0].get_model_by_name('grid-labels').data.text[0]")
            received.clear()
            t1 = time.perf_counter()
            page.get_by_role("button", name="next ▶").click()
            page.wait_for_function("""(first) => {
                const t = Bokeh.documents[0].get_model_by_name('grid-labels').data.text;
                return t.length > 0 && t[0] !== first && """ + TILES_LOADED + "; }", arg=first, timeout=30_000,
                                   polling="raf")
            page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            times[key].append(since(t1))
            hoverable(page, f"{key}_hoverable", t1)
            page.wait_for_timeout(800)
            switch_bytes.append(sum(received))
        again = ctx.new_page()  # the same context: the scripts and styles are cached
        t2 = time.perf_counter()
        again.goto(url)
        again.wait_for_function(PAGE_READY, timeout=60_000, polling="raf")
        times["open_cached"].append(since(t2))
        ctx.close()
    out: dict[str, Any] = {f"{k}_p50_ms": float(np.median(v)) for k, v in times.items() if v}
    out.update(open_MB=float(np.median(open_bytes)) / 1e6, switch_MB=float(np.median(switch_bytes)) / 1e6)
    return out


def run_path(store: str, path: str, sessions: list[int], moves: int, workdir: str,
             repeats: int = 5) -> list[dict[str, Any]]:
    from playwright.sync_api import sync_playwright

    budget = "32M" if path == "browser" else "0"
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        for n in sessions:
            server = serve_explorer([store], "--page-size", str(PAGE), "--tile-px", "110", "-k", "8",
                                    "--browser-hover-budget", budget, log_dir=workdir, name=f"{path}-{n}")
            try:
                row: dict[str, Any] = {"path": path, "sessions": n}
                if n == sessions[0]:
                    row.update(open_and_switch(browser, server.url, repeats, path == "browser"))
                page = browser.new_page(viewport={"width": 1600, "height": 1300})
                page.goto(server.url)
                page.wait_for_function(PAGE_READY if path == "server" else PAGE_HOVERABLE, timeout=60_000,
                                       polling="raf")
                page.wait_for_timeout(500)
                bg = Background(server.url, n - 1, path == "browser").start()
                settle(server.proc.pid)  # the sessions' own start-up work is not hover load
                bg.go()
                cpu0 = cpu_seconds(server.proc.pid)
                t0 = time.perf_counter()
                lat = measure_moves(page, moves, seed=n)
                wall = time.perf_counter() - t0
                cpu = cpu_seconds(server.proc.pid) - cpu0
                bg.stop()
                page.close()
                p50, p99 = _pct(lat)
                total_moves = len(lat) + 5 + bg.moves
                row.update(paint_p50_ms=p50, paint_p99_ms=p99, moves=total_moves, wall_s=wall,
                           server_cpu_ms_per_move=1000 * cpu / max(1, total_moves),
                           rests=bg.rests, rests_answered=bg.answered, session_failures=bg.failures)
            finally:
                server.stop()
            row["server_errors"] = server.errors()
            rows.append(row)
            print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        browser.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.browser_hover", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--moves", type=int, default=150, help="measured pointer moves in Chromium per row")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 20, 50])
    p.add_argument("--repeats", type=int, default=5,
                   help="page opens (each with three switches) behind the open and switch p50s")
    p.add_argument("--paths", nargs="+", default=["browser", "server"], choices=["browser", "server"])
    p.add_argument("--stores", default=None, help="folder to keep the synthetic store in")
    p.add_argument("--geometry", default="v2", choices=list(GEOMETRIES),
                   help="layer dims of the default model: v1 the old signed defaults (D 40/112/320), v2 "
                        "today's non-negative ones (D 240/672/1280)")
    p.add_argument("--name", default="browser-hover", help="results/<name>.json")
    args = p.parse_args(argv)
    use_geometry(args.geometry)
    folder = args.stores or tempfile.mkdtemp(prefix="hoverlay-bench-")
    store = make_store(os.path.join(folder, f"store-{args.geometry}-{args.images}"), args.images)
    for layer in LAYERS:  # as `hoverlay build` leaves a store: an index per layer (rests search it)
        if not os.path.exists(os.path.join(store, "index", f"{layer}.faiss")):
            print("index", layer, build_index(store, layer), flush=True)
    workdir = tempfile.mkdtemp(prefix="hoverlay-bench-logs-")
    rows = [row for path in args.paths
            for row in run_path(store, path, args.sessions, args.moves, workdir, args.repeats)]
    path = report(args.name, rows, extra={
        "page": PAGE, "layers": LAYERS, "geometry": args.geometry, "targets": {"paint_p50_ms": 16, "paint_p99_ms": 33, "open_ms": 1000,
                                                     "switch_ms": 300},
        "open_and_switch": "shown: the page's images and captions painted; hoverable: its vectors in the browser too",
        "repeats": args.repeats,
        "peer": "the same server with --browser-hover-budget 0 (the server path: one message per patch change)"})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
