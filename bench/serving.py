"""Serving benchmarks: many sessions hovering at once, reload latency, kills during index saves.

``python -m bench.serving [--sessions 10 20 40] [--strokes 2] [--kills 20]`` starts real servers
(``python -m hoverlay.explorer.serve``) on synthetic stores, drives them with
:class:`bench.wsclient.BokehSession` clients and writes ``bench/results/serving.json``. The
lighter versions of the same checks are ``tests/test_serving.py``.

What a client does (:func:`hover_like_a_user`): strokes of pointer moves at ``rate`` patch
changes per second, sent without waiting for replies as a browser does, separated by rests long
enough for the explorer's "pointer rests" work (layer view, top-k search and its cards). The
latency of a move is the time from sending it to the first overlay update after it; under load
the server drops the moves a newer one supersedes (latest wins), so that update shows this move
or a newer one, and the last move's answer is the update that leaves the overlays showing it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import report
from bench.servers import serve_explorer
from bench.wsclient import BokehSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: Seconds without an overlay update after which a client takes its last move as answered.
QUIET = 1.0


@dataclass
class ClientRun:
    sent: list[float]  # perf_counter() of each move
    got: list[float]  # arrival of each overlay update (in order)
    cells: list[tuple[int, int, int]]  # (tile, y, x) of each move
    topk: bool  # whether the session showed a top-k result

    @property
    def latencies(self) -> list[float]:
        """Per move: the wait for the first overlay update after it (the server draws only the
        latest of a burst of moves, so that update shows this move or a newer one)."""
        got, sent = np.asarray(self.got), np.asarray(self.sent)
        first = np.searchsorted(got, sent)  # the first update at or after each move (both in order)
        answered = first < got.size
        return (got[first[answered]] - sent[answered]).tolist()

    @property
    def last_answer(self) -> float | None:
        """Seconds from the last move to the first overlay update after it, which draws the
        latest move the server has read (None: never answered)."""
        later = [g for g in self.got if g >= self.sent[-1]] if self.sent else []
        return later[0] - self.sent[-1] if later else None

    @property
    def final_answer(self) -> float | None:
        """Seconds from the last move to the last overlay update, the one the session ended
        with: the last move's own answer when the final overlays show its patch, which callers
        check (an update just after the last move may still draw an earlier one)."""
        return self.got[-1] - self.sent[-1] if self.sent and self.got and self.got[-1] >= self.sent[-1] else None


async def hover_like_a_user(s: BokehSession, seed: int, *, strokes: int = 2, moves: int = 8,
                            rate: float = 6.0, rest: float = 0.6, drain: float = 7.0,
                            tiles: int = 8, grid: tuple[int, int] = (8, 8), topk: bool = True) -> ClientRun:
    """Strokes of ``moves`` pointer moves at ``rate``/s, each followed by a ``rest``; then wait up
    to ``drain`` seconds for the overlays of every move (and a top-k, if ``topk``)."""
    rng = random.Random(seed)
    ids = s.overlay_ids()
    settle_until = time.perf_counter() + 3.0  # let the page's own start-up updates arrive first
    while time.perf_counter() < settle_until and s.updates and time.perf_counter() - s.updates[-1].time < 0.3:
        await asyncio.sleep(0.05)
    base = len(s.updates)
    sent: list[float] = []
    cells: list[tuple[int, int, int]] = []
    for _ in range(strokes):
        start = time.perf_counter()
        for n in range(moves):
            cell = cells[-1] if cells else (-1, -1, -1)
            while cell[0] < 0 or (cells and cell == cells[-1]):  # the page only sends patch changes
                cell = (rng.randrange(tiles), rng.randrange(grid[0]), rng.randrange(grid[1]))
            cells.append(cell)
            sent.append(time.perf_counter())
            s.pointer(*cell)
            # on a schedule, not a sleep per move: a busy client would fall behind the rate
            await asyncio.sleep(max(0.0, start + (n + 1) / rate - time.perf_counter()))
        await asyncio.sleep(rest)

    def answered() -> bool:  # the last move's overlays (then quiet), and the top-k of the last rest
        overlays = [u.time for u in s.updates[base:] if u.models & ids]
        settled = bool(overlays) and overlays[-1] >= sent[-1] and time.perf_counter() - overlays[-1] > QUIET
        return settled and (not topk or rest < 0.2 or "patches of the store closest to" in s.texts())

    deadline = time.perf_counter() + drain
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):  # counted by the caller
        # checked every 0.1 s too: "then quiet" becomes true with no message to wake a wait_for
        while not answered() and time.perf_counter() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await s.wait_for(answered, min(0.1, max(0.0, deadline - time.perf_counter())))
    got = [u.time for u in s.updates[base:] if u.models & ids]
    return ClientRun(sent, got, cells, "patches of the store closest to" in s.texts())


def percentiles(runs: list[ClientRun]) -> dict[str, float]:
    lat = np.array([x for r in runs for x in r.latencies]) * 1000
    if lat.size == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    p50, p95, p99, worst = np.percentile(lat, [50, 95, 99, 100])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": float(worst)}


# ------------------------------------------------------------------------- plumbing
def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


# ---------------------------------------------------------------------------- load
async def _load(url: str, n: int, strokes: int, rate: float, live: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    sessions = await asyncio.gather(*(BokehSession.open(url) for _ in range(n)))
    opened = time.perf_counter() - t0

    async def user(i: int, s: BokehSession) -> ClientRun:
        await asyncio.sleep(random.Random(i).uniform(0, 2.0))  # users do not start in step
        return await hover_like_a_user(s, i, strokes=strokes, moves=15, rate=rate, rest=0.6, drain=60, topk=live)

    try:
        t1 = time.perf_counter()
        runs = await asyncio.gather(*(user(i, s) for i, s in enumerate(sessions)))
        wall = time.perf_counter() - t1
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    moves = sum(len(r.sent) for r in runs)
    return {"sessions": n, "open_s": opened, "hover_wall_s": wall, "moves": moves,
            "answered": sum(len(r.got) for r in runs), "topk_shown": sum(r.topk for r in runs),
            **percentiles(runs)}


def bench_load(store: str, sessions: list[int], strokes: int, rate: float, workdir: str) -> list[dict[str, Any]]:
    rows = []
    for live in (True, False):
        for n in sessions:
            server = serve_explorer([store], "--page-size", "8", "-k", "5", "--browser-hover-budget", "0",
                                    *([] if live else ["--no-live-topk"]),
                                    log_dir=workdir, name=f"load-{n}-{live}")
            try:
                cpu0 = cpu_seconds(server.proc.pid)
                row = asyncio.run(_load(server.url, n, strokes, rate, live))
                row["server_cpu_s"] = cpu_seconds(server.proc.pid) - cpu0
            finally:
                server.stop()
            row.update(live_topk=live, server_errors=server.errors())
            rows.append(row)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return rows


# -------------------------------------------------------------------------- reload
async def _reload(url: str, store: str, commits: int, interval: float) -> list[float]:
    from hoverlay.stores.synthetic import append_synthetic_images

    s = await BokehSession.open(url)
    delays = []
    try:
        for c in range(commits):
            start = append_synthetic_images(store, 8, seed=100 + c, label="r", hash_prefix=f"r{c}-")
            t = time.perf_counter()
            await s.wait_for(lambda n=start + 8: f"· {n} images" in s.texts(), 10 * interval + 10)
            delays.append(time.perf_counter() - t)
            await asyncio.sleep(random.uniform(0, interval))
    finally:
        await s.close()
    return delays


def bench_reload(store: str, commits: int, interval: float, workdir: str) -> dict[str, Any]:
    server = serve_explorer([store], "--page-size", "8", "--browser-hover-budget", "0", "--reload-interval", str(interval), log_dir=workdir,
                           name="reload")
    try:
        idle0 = cpu_seconds(server.proc.pid)
        time.sleep(5)
        idle = (cpu_seconds(server.proc.pid) - idle0) / 5
        delays = asyncio.run(_reload(server.url, store, commits, interval))
    finally:
        server.stop()
    row = {"interval_s": interval, "commits": commits, "idle_cpu_fraction": idle,
           "visible_after_p50_s": float(np.median(delays)), "visible_after_max_s": float(np.max(delays))}
    print(row, flush=True)
    return row


# -------------------------------------------------------------------- kills in save
SAVER = """
import sys, numpy as np
from hoverlay.stores import PatchIndex
url, n = sys.argv[1], int(sys.argv[2])
vecs = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
versions = []
for total in (n // 2, n):
    index = PatchIndex.create(64, "IDMap,Flat")
    index.add(vecs[:total], np.arange(total))
    index.meta.images_indexed = total
    versions.append(index)
versions[0].save(url, "l")
print("saved", flush=True)
while True:
    for index in versions[::-1] + versions:
        print("saving", index.ntotal, flush=True)
        index.save(url, "l")
"""


def bench_kills(kills: int, n: int, workdir: str) -> dict[str, Any]:
    from hoverlay.stores import PatchIndex
    from hoverlay.stores.errors import StoreError

    url = os.path.join(workdir, "kill-store")
    outcomes: dict[str, int] = {"old_or_new": 0, "stale_detected": 0, "unloadable": 0}
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, url, str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()
        for _ in range(random.randint(1, 3)):
            proc.stdout.readline()
        time.sleep(random.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            index = PatchIndex.load(url, "l")
            ok = index.ntotal in (n // 2, n) and index.meta.images_indexed == index.ntotal
            outcomes["old_or_new" if ok else "unloadable"] += 1
        except StoreError:
            outcomes["stale_detected"] += 1
        except Exception:
            outcomes["unloadable"] += 1
    row = {"kills": kills, "vectors": n, **outcomes}
    print(row, flush=True)
    return row


def add_index(store: str, layer: str) -> None:
    from hoverlay.stores import PatchIndex, open_store

    r = open_store(store)
    g = r.geometry(layer)
    vecs = r.vectors(layer, slice(None)).reshape(-1, g.dim).astype(np.float32)
    index = PatchIndex.create(g.dim, "IDMap,Flat")
    index.add(vecs, np.arange(len(vecs), dtype=np.int64))
    index.meta.images_indexed = r.n_images
    index.save(store, layer)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--strokes", type=int, default=2, help="strokes of 15 moves (then a rest) per session")
    p.add_argument("--rate", type=float, default=15.0, help="patch changes per second while moving")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--commits", type=int, default=8)
    args = p.parse_args(argv)

    from hoverlay.stores import LayerGeometry
    from hoverlay.stores.synthetic import make_synthetic_store

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        store = os.path.join(tmp, "store")
        make_synthetic_store(store, args.images, layers={"fine": LayerGeometry(8, 8, 16),
                                                         "coarse": LayerGeometry(4, 4, 32)}, image_size=64)
        for layer in ("fine", "coarse"):  # as a build leaves it: top-k through an index
            add_index(store, layer)
        load = bench_load(store, args.sessions, args.strokes, args.rate, tmp)
        reload_row = bench_reload(store, args.commits, 1.0, tmp)
        kills = bench_kills(args.kills, 200_000, tmp)
    report("serving", load, extra={"reload": reload_row, "kills": kills})


if __name__ == "__main__":
    main()
