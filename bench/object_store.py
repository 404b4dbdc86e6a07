"""Explorer page open and top-k latency from an S3 store against the same images on local disk (#18).

    python -m bench.object_store [--images 40] [--opens 10] [--rests 20] [--workdir DIR]

One moto S3 server process (moto's standalone server, as the tests use) on 127.0.0.1, a bucket,
and ``--images`` generated 320-px JPEGs built twice with the default model (EfficientNet-Lite0,
its three default layers, FAISS indexes included): once into a local folder and once into
``s3://bench/store`` (a real ``build()`` into the bucket through ``storage_options``, the images
read from local disk: the store's bytes are the builder's own, not a copy). Each store is then
served by its own real ``hoverlay serve`` process (``python -m hoverlay.explorer.serve``; for S3
with ``--storage-options`` and the AWS_* test credentials in its environment), default page
(16 tiles) and k (8), and driven by :class:`bench.wsclient.BokehSession` clients, which is all a
browser tab is to the server. Both servers run for the whole measurement and every case
alternates between them, so the machine's load hits both alike.

- **page open**: GET the page (creates the session), open ``/ws``, pull the document, until the
  document holds the first page: the 16 tiles' pixels (``grid-rgb``) and every layer's page
  vectors (``grid-vectors:*``, which the browser hovers with). These travel in the pulled
  document (the vectors, set just after the session was created, in a later message when the
  server was slower than the page), so the client can tell when they have arrived without a
  browser (no Chromium: its drawing would cost both cases the same). The first open of each process is
  reported apart (it reads the layer statistics); p50/p90 over the ``--opens`` after it, each
  a new session.
- **top-k**: in one open session per server, a pointer row on a new patch (the message a page
  sends once the pointer rests, after its own 120 ms rest timer, which is not included) to the
  arrival of both the top-k heading naming that patch and its cards (crops of the hits, cut from
  the store's pixels). The first rest loads the layer's index (reported apart); p50/p90 over the
  ``--rests`` after it, each on a different patch, the same patches for both servers.
- **where the indexes come from**: read from :mod:`stores.index` (``PatchIndex.load``) and
  checked in moto's request log: a local store memory-maps ``index/<layer>.faiss``; an S3 store
  has no local cache: at a layer's first search the server GETs the whole ``.faiss`` object from
  the bucket and deserialises it into its own memory, where it stays for the process's life (no
  re-rank file on S3: ``stores.rerank.rerank_path`` is None for remote stores; these HNSW fp16
  indexes need none). The requests moto logged per page open and per rest are counted.

Results: ``bench/results/object-store.json`` (with the load average before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import report
from bench.pipeline import make_images
from bench.servers import Server, free_port, serve_explorer
from bench.wsclient import BokehSession

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"
#: A request in moto's (werkzeug's) log: method and path (206 answers are wrapped in colour codes).
REQUEST = re.compile(r"(GET|HEAD|PUT|POST|DELETE) (/\S*) HTTP/1")
#: The snap layer's row in the page's layer list: "_blocks.5._swish  28×28×240  ◆ pointer snaps here".
SNAP_ROW = re.compile(r"(\d+)×(\d+)×\d+\s+◆")


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the served code differed from it (uncommitted edits)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "explorer", "stores", "pipeline", "hoverlay")
    return {"commit": git("rev-parse", "HEAD"), "tree": root,
            "uncommitted_in_served_code": None if dirty is None else dirty.splitlines()}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# ------------------------------------------------------------------------------- moto
class Moto:
    """A moto S3 server process on 127.0.0.1 with one bucket; its request log in a file."""

    def __init__(self, work: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "moto.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        os.environ.update(CREDENTIALS)  # the in-process build reads them, as s3fs does
        server = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{self.log_path.read_text()}") from None
                time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem(endpoint_url=self.endpoint).mkdir(BUCKET)

    def mark(self) -> int:
        self._log.flush()
        return self.log_path.stat().st_size

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, path) of every request moto logged after ``mark()`` returned ``since``."""
        with open(self.log_path, "rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
        return REQUEST.findall(text)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def kinds(requests: list[tuple[str, str]]) -> dict[str, int]:
    """Requests by what they read: zarr.json documents, pixels, vectors, norms, index, table, other."""
    out: dict[str, int] = {}
    for method, path in requests:
        path = path.split("?")[0]
        kind = ("index" if "/index/" in path else "zarr.json" if path.endswith("zarr.json")
                else "pixels" if "/pixels/" in path else "vectors" if "/vectors/" in path
                else "norms" if "/norms/" in path else "table" if "/table/" in path else "other")
        key = f"{method} {kind}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def median_kinds(windows: list[dict[str, int]]) -> dict[str, float]:
    keys = sorted({k for w in windows for k in w})
    return {k: float(np.median([w.get(k, 0) for w in windows])) for k in keys}


def index_gets(requests: list[tuple[str, str]]) -> list[str]:
    """The ``index/*.faiss`` objects among ``requests`` that were GET."""
    return [p.split("?")[0].rsplit("/", 1)[-1] for m, p in requests if m == "GET" and "/index/" in p
            and p.split("?")[0].endswith(".faiss")]


# ------------------------------------------------------------------------------ build
def build_store(images: str, store: str, **kw: Any) -> float:
    from hoverlay.pipeline.build import build

    t0 = time.perf_counter()
    build(images, store, quiet=True, **kw)  # prints its summary line
    seconds = time.perf_counter() - t0
    return seconds


def index_facts(store: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    from hoverlay.stores import open_store
    from hoverlay.stores.index import read_index_meta

    reader = open_store(store, storage_options=storage_options)
    out = {}
    for layer in reader.layers:
        meta = read_index_meta(store, layer, storage_options)
        g = reader.geometry(layer)
        out[layer] = {"geometry": [g.height, g.width, g.dim], "factory": getattr(meta, "factory", None),
                      "ntotal": getattr(meta, "ntotal", None)}
    return out


# ---------------------------------------------------------------------- measurements
def page_ready(s: BokehSession) -> bool:
    """The first page as the client's document holds it: every tile's pixels and page vectors."""
    rgb = s.by_name("grid-rgb").attributes.get("data") or {}
    vectors = s.named("grid-vectors:")
    tiles = len(rgb.get("image") or [])
    return tiles > 0 and bool(vectors) and all(
        np.size((m.attributes.get("data") or {}).get("v", [])) > 0 for m in vectors.values())


async def page_open(url: str) -> float:
    t0 = time.perf_counter()
    s = await BokehSession.open(url)
    try:
        if not page_ready(s):
            await s.wait_for(lambda: page_ready(s), 30)
        return time.perf_counter() - t0
    finally:
        await s.close()


def cards_model(s: BokehSession) -> set[str]:
    return {m.id for m in s.models.values() if "cards" in m.attributes}


async def rest(s: BokehSession, tile: int, y: int, x: int, timeout: float = 60) -> tuple[float, list]:
    """Pointer row on (tile, y, x) -> the top-k heading for that patch and its cards arrived."""
    image = s.page_image_ids()[tile]
    want = f"closest to #{image} ({y},{x})"
    seen = len(s.updates)
    t0 = time.perf_counter()
    s.pointer(tile, y, x)

    def done() -> bool:
        cards = cards_model(s)
        return want in s.texts() and any(u.models & cards for u in s.updates[seen:])

    await s.wait_for(done, timeout)
    cards = cards_model(s)
    shown = next(u for u in s.updates[seen:] if u.models & cards)  # heading first, then cards
    heads = {m.id for m in s.models.values() if want in str(m.attributes.get("text", ""))}
    headed = next(u for u in s.updates[seen:] if u.models & heads)
    arrived = max(shown.time, headed.time)
    hits = s.models[next(iter(shown.models & cards))].attributes.get("cards") or []
    return arrived - t0, [(c.get("image"), c.get("y"), c.get("x")) for c in hits]


def snap_grid(s: BokehSession) -> tuple[int, int]:
    found = SNAP_ROW.search(s.texts())
    if found is None:
        raise RuntimeError("the page names no snap layer")
    return int(found.group(1)), int(found.group(2))


def rss_anon_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float]) -> tuple[float, float]:
    p50, p90 = np.percentile(np.asarray(values) * 1000, [50, 90])
    return float(p50), float(p90)


async def measure(servers: dict[str, Server], moto: Moto, opens: int, rests: int, seed: int) -> dict[str, Any]:
    cases = list(servers)
    res: dict[str, dict[str, Any]] = {c: {"opens": [], "rests": [], "hits": [], "open_requests": [],
                                          "rest_requests": [], "index_gets": []} for c in cases}
    # page opens: the first of each process apart, then alternating, the order swapped every round
    for c in cases:
        mark = moto.mark()
        res[c]["first_open"] = await page_open(servers[c].url)
        await asyncio.sleep(0.3)  # requests logged just after the answer belong to it
        res[c]["first_open_requests"] = kinds(moto.requests(mark))
        res[c]["first_open_index_gets"] = index_gets(moto.requests(mark))
    for i in range(opens):
        for c in cases if i % 2 == 0 else cases[::-1]:
            mark = moto.mark()
            res[c]["opens"].append(await page_open(servers[c].url))
            await asyncio.sleep(0.3)  # requests logged just after the answer belong to it
            res[c]["open_requests"].append(kinds(moto.requests(mark)))
            res[c]["index_gets"] += index_gets(moto.requests(mark))
    # top-k: one session per server; rest 0 loads the index, then `rests` new patches
    sessions = {c: await BokehSession.open(servers[c].url) for c in cases}
    try:
        for s in sessions.values():
            await s.wait_for(lambda s=s: page_ready(s), 30)
        await asyncio.sleep(1.0)  # the sessions' own start-up updates
        h, w = snap_grid(sessions[cases[0]])
        tiles = len(sessions[cases[0]].page_image_ids())
        rng = random.Random(seed)
        cells: list[tuple[int, int, int]] = []
        while len(cells) < rests + 1:
            cell = (rng.randrange(tiles), rng.randrange(h), rng.randrange(w))
            if cell not in cells:
                cells.append(cell)
        for i, cell in enumerate(cells):
            for c in cases if i % 2 == 0 else cases[::-1]:
                mark = moto.mark()
                seconds, hits = await rest(sessions[c], *cell)
                await asyncio.sleep(0.3)  # requests logged after the answer (the reload watcher's too)
                got = moto.requests(mark)
                if i == 0:
                    res[c].update(first_rest=seconds, first_rest_requests=kinds(got),
                                  first_rest_index_gets=index_gets(got))
                else:
                    res[c]["rests"].append(seconds)
                    res[c]["rest_requests"].append(kinds(got))
                    res[c]["index_gets"] += index_gets(got)
                res[c]["hits"].append(hits)
    finally:
        for s in sessions.values():
            await s.close()
    for c in cases:
        res[c]["rss_anon_mb"] = rss_anon_mb(servers[c].proc.pid)
    res["cells"] = cells
    res["snap_grid"] = [h, w]
    return res


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--opens", type=int, default=10, help="page opens per store after the first")
    p.add_argument("--rests", type=int, default=20, help="pointer rests per store after the first")
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="hoverlay-bench-s3-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before, uptime_before = os.getloadavg(), uptime()
    started = time.perf_counter()
    images = str(work / "images")  # one folder "gen": the label
    make_images(os.path.join(images, "gen"), a.images, seed=5)
    moto = Moto(work)
    servers: dict[str, Server] = {}
    try:
        so = {"endpoint_url": moto.endpoint}
        local, s3 = str(work / "local.zarr"), f"s3://{BUCKET}/store"
        shutil.rmtree(local, ignore_errors=True)
        mark = moto.mark()
        build_s = {"local": build_store(images, local, model=a.model),
                   "s3": build_store(images, s3, model=a.model, storage_options=so)}
        build_requests = kinds(moto.requests(mark))
        facts = {"local": index_facts(local, None), "s3": index_facts(s3, so)}
        mark = moto.mark()
        t0 = time.perf_counter()
        servers["local"] = serve_explorer([local], log_dir=work, name="serve-local", env=CREDENTIALS)
        start_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        servers["s3"] = serve_explorer([s3], "--storage-options", json.dumps(so), log_dir=work,
                                       name="serve-s3", env=CREDENTIALS)
        start_s3 = time.perf_counter() - t0
        start_requests = moto.requests(mark)
        res = asyncio.run(measure(servers, moto, a.opens, a.rests, a.seed))
        errors = {c: s.errors() for c, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
        moto.stop()
    load_after, uptime_after = os.getloadavg(), uptime()

    loc, rem = res["local"], res["s3"]
    same = sum(x == y for x, y in zip(loc["hits"], rem["hits"], strict=True))
    rows: list[dict[str, Any]] = []

    def row(what: str, n: int, lv: float, sv: float) -> None:
        rows.append({"measure": what, "n": n, "local_ms": lv, "s3_ms": sv, "s3/local": sv / lv})

    row("server start (process -> /liveness)", 1, start_local * 1000, start_s3 * 1000)
    row("page open, first of the process", 1, loc["first_open"] * 1000, rem["first_open"] * 1000)
    (lo50, lo90), (so50, so90) = pct(loc["opens"]), pct(rem["opens"])
    row("page open p50", len(loc["opens"]), lo50, so50)
    row("page open p90", len(loc["opens"]), lo90, so90)
    row("top-k, first rest (loads the index)", 1, loc["first_rest"] * 1000, rem["first_rest"] * 1000)
    (lr50, lr90), (sr50, sr90) = pct(loc["rests"]), pct(rem["rests"])
    row("top-k p50 (pointer rest -> heading + cards)", len(loc["rests"]), lr50, sr50)
    row("top-k p90", len(loc["rests"]), lr90, sr90)
    index_source = {
        "local": "index/<layer>.faiss memory-mapped from the store folder at the layer's first search "
                 "(stores.index.PatchIndex.load, IO_FLAG_MMAP_IFC|READ_ONLY); nothing copied",
        "s3": "no local cache: at a layer's first search the server GETs the whole index/<layer>.faiss "
              "object (fs.cat_file) and deserialises it into its own memory, kept for the process's life "
              "(new indexes are fetched again after a commit); no re-rank file for remote stores",
        "s3_faiss_gets_server_start": index_gets(start_requests),
        "s3_faiss_gets_first_open": rem["first_open_index_gets"],
        "s3_faiss_gets_first_rest": rem["first_rest_index_gets"],
        "s3_faiss_gets_later_opens_and_rests": rem["index_gets"],
    }
    extra = {
        "code": code_version(), "model": a.model, "images": a.images, "layers": facts["local"], "s3_layers": facts["s3"],
        "build_s": {**build_s, "note": "not a comparison: the local build runs first and pays the imports "
                                       "and the model load (bench.pipeline --scaling measures S3 vs disk builds)"},
        "how_built": "two real build() calls from the same local JPEGs: one into a folder, one into "
                     "s3://bench/store on moto through storage_options (the builder's own bytes, not a copy)",
        "page_open": "GET page + websocket + PULL-DOC until grid-rgb (16 tiles' pixels) and every "
                     "grid-vectors:* source are in the client's document "
                     "(bench.wsclient, no browser)",
        "topk": "pointer row on a new patch (browser path: the page sends it after its 120 ms rest, "
                "not included) -> the top-k heading naming that patch and its cards arrived",
        "index_source": index_source,
        "moto_requests": {"s3_build": build_requests, "server_start": kinds(start_requests),
                          "first_open": rem["first_open_requests"],
                          "per_open_median": median_kinds(rem["open_requests"]),
                          "per_open_total_median": float(np.median([sum(w.values()) for w in rem["open_requests"]])),
                          "first_rest": rem["first_rest_requests"],
                          "per_rest_median": median_kinds(rem["rest_requests"]),
                          "per_rest_total_median": float(np.median([sum(w.values()) for w in rem["rest_requests"]])),
                          "note": "the s3 server's reload watcher also polls the bucket every 2 s; "
                                  "requests in a window include those"},
        "same_topk_hits": f"{same} of {len(loc['hits'])} rests",
        "raw_ms": {c: {"first_open": res[c]["first_open"] * 1000, "opens": [v * 1000 for v in res[c]["opens"]],
                       "first_rest": res[c]["first_rest"] * 1000, "rests": [v * 1000 for v in res[c]["rests"]]}
                   for c in ("local", "s3")},
        "server_rss_anon_mb": {c: res[c]["rss_anon_mb"] for c in ("local", "s3")},
        "server_errors": errors, "cells": res["cells"], "snap_grid": res["snap_grid"],
        "load_average_before_after": [list(load_before), list(load_after)],
        "uptime_before_after": [uptime_before, uptime_after],
        "wall_s": time.perf_counter() - started,
    }
    report("object-store", rows, extra)
    print("index files:", index_source["local"], "|", index_source["s3"])
    print("S3 .faiss GETs: server start", index_source["s3_faiss_gets_server_start"], "first open",
          index_source["s3_faiss_gets_first_open"], "first rest", index_source["s3_faiss_gets_first_rest"],
          "later", index_source["s3_faiss_gets_later_opens_and_rests"])
    print("moto requests:", extra["moto_requests"])
    print(f"same top-k hits local vs S3: {extra['same_topk_hits']}; server errors {errors}; "
          f"RssAnon MB {extra['server_rss_anon_mb']}")
    print(f"load average before {load_before}, after {load_after}; "
          f"wall {extra['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
