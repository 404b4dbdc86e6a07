"""Pointer rests against one server process on the browser path, long enough to pass first rests.

    python -m bench.rests [--images 200] [--sessions 10 49] [--seconds 40] [--read-cache 256M]

On the browser path the server hears a session only when its pointer rests: then it draws the
query-patch view, searches the top-k and crops the hits. The sessions are
:class:`bench.browser_hover.Background`'s Bokeh-protocol clients, each doing what a hovering user
does there: a stroke of 15 moves at 15/s (nothing sent), one rest (the one message), a wait for
that rest's top-k (at most 10 s), a 0.6 s pause. Unlike that benchmark's ~7 s window, which holds
mostly each session's first rests, this one runs ``--seconds`` after every session has opened and
the server is idle, so it measures steady rests. Reported per row: rests sent and answered within
10 s, rest -> top-k p50 / p90, and the server's CPU per rest. Results: ``bench/results/rests.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import numpy as np

from bench.browser_hover import ANSWER_S, Background, settle
from bench.common import report
from bench.hover import LAYERS, PAGE, build_index, make_store, use_geometry
from bench.servers import Server, serve_explorer
from bench.serving import cpu_seconds

#: how long opening the sessions may take (49 took 80 s on the project's 2-core machine)
OPEN_TIMEOUT_S = 600


def measure(server: Server, n: int, seconds: float) -> dict[str, Any]:
    """``n`` sessions resting for ``seconds`` once they have opened and the server is idle."""
    pid = server.proc.pid
    bg = Background(server.url, n, browser_path=True).start(OPEN_TIMEOUT_S)
    settle(pid)  # opening sessions is not rest load
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    bg.go()
    time.sleep(seconds)
    bg.stop()  # each session finishes the rest it waits for
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    lat = np.array(bg.latencies) * 1000
    p50, p90 = np.percentile(lat, [50, 90]) if lat.size else (float("nan"), float("nan"))
    return {"sessions": n, "rests": bg.rests, "answered": bg.answered, "wall_s": wall,
            "rest_p50_ms": float(p50), "rest_p90_ms": float(p90),
            "server_cpu_ms_per_rest": 1000 * cpu / max(1, bg.rests), "session_failures": bg.failures}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rests", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--sessions", type=int, nargs="+", default=[10, 49])
    p.add_argument("--seconds", type=float, default=40.0, help="rest load per row, after the sessions opened")
    p.add_argument("--read-cache", default=None, help="the server's --read-cache (default: its own)")
    p.add_argument("--stores", default=None, help="folder to keep the synthetic store in")
    p.add_argument("--name", default="rests", help="results/<name>.json")
    args = p.parse_args(argv)
    use_geometry("v2")
    folder = args.stores or tempfile.mkdtemp(prefix="hoverlay-bench-")
    store = make_store(os.path.join(folder, f"store-v2-{args.images}"), args.images)
    for layer in LAYERS:
        if not os.path.exists(os.path.join(store, "index", f"{layer}.faiss")):
            print("index", layer, build_index(store, layer), flush=True)
    logs = tempfile.mkdtemp(prefix="hoverlay-bench-logs-")
    extra = ["--read-cache", args.read_cache] if args.read_cache else []
    rows = []
    for n in args.sessions:
        server = serve_explorer([store], "--page-size", str(PAGE), "--tile-px", "110", "-k", "8", *extra,
                                log_dir=logs, name=f"rests-{n}")
        try:
            row = measure(server, n, args.seconds)
        finally:
            server.stop()
        row["server_errors"] = server.errors()
        rows.append(row)
        print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    path = report(args.name, rows, extra={"page": PAGE, "layers": LAYERS, "answer_within_s": ANSWER_S,
                                          "read_cache": args.read_cache or "server default"})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
