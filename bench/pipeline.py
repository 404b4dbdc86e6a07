"""P1 and P6 for the pipeline.

P1: images/s of ``hoverlay build`` ÷ images/s of a bare torch loop doing only the forward pass
(same model, layers, batch size, pre-decoded inputs), measured in one run. Target ≥ 0.9.
P6: peak RSS of a build subprocess for N and 10·N images (must stay flat).
Scaling (``--scaling SMALL,LARGE``, results in ``pipeline-scaling.json``): the *marginal*
embedding rate, (LARGE − SMALL) / (t_LARGE − t_SMALL), of the threaded build and of 1 and 2
local Dask worker processes (``LocalCluster``, one thread each, reached by address as a real
cluster is), all warm (model loaded), so start-up cancels out; what a worker costs to start
(cluster start, and the first build on fresh workers minus the same build warm); and images/s
of one threaded build from a moto S3 server into S3 vs from disk to disk (same images).

    python -m bench.pipeline [--images 200] [--large 2000] [--batch-size 16]
    python -m bench.pipeline --scaling 40,160 --only-scaling
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from bench.common import report


def make_images(folder: str, n: int, size: int = 320, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        path = os.path.join(folder, f"{i:06d}.jpg")
        if os.path.exists(path):
            continue
        f = rng.uniform(0.01, 0.1, size=3)
        img = 127 + 120 * np.sin(xx[..., None] * f + yy[..., None] * f[::-1] + rng.uniform(0, 6, 3))
        Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
    return folder


def bare_forward(folder: str, model: str, layers: list[str] | None, batch_size: int,
                 device: str = "cpu") -> float:
    """images/s of extract() alone on pre-decoded, pre-resized pixels."""
    from hoverlay.pipeline.models import load_model
    from hoverlay.pipeline.preprocess import load_pixels
    from hoverlay.pipeline.sources import read_bytes

    adapter = load_model(model, device=device)
    layers = layers or adapter.default_layers
    files = sorted(os.listdir(folder))
    pixels = np.stack([load_pixels(read_bytes(os.path.join(folder, f)), adapter.image_size)
                       for f in files])
    adapter.extract(pixels[:batch_size], layers)  # warm-up (tracing, allocator)
    t0 = time.perf_counter()
    for b in range(0, len(pixels), batch_size):
        adapter.extract(pixels[b:b + batch_size], layers)
    return len(pixels) / (time.perf_counter() - t0)


def build_rate(folder: str, store: str, model: str, batch_size: int, device: str = "cpu",
               **kw: object) -> float:
    from hoverlay.pipeline.build import build
    from hoverlay.pipeline.models import load_model

    adapter = load_model(model, device=device)  # loading the weights and tracing are start-up, not throughput
    adapter.extract(np.zeros((1, adapter.image_size, adapter.image_size, 3), np.uint8),
                    adapter.default_layers)
    adapter.check_layers(adapter.default_layers)
    shutil.rmtree(store, ignore_errors=True)  # a reused store would skip every image
    s = build(folder, store, model=model, batch_size=batch_size, chunk=batch_size, index=False,
              quiet=True, device=device, **kw)
    return s.added / s.seconds


def _timed_build(folder: str, store: str, model: str, batch_size: int, **kw: object) -> float:
    from hoverlay.pipeline.build import build

    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    s = build(folder, store, model=model, batch_size=batch_size, chunk=batch_size, index=False,
              quiet=True, **kw)
    assert "://" in folder or s.added == len(os.listdir(folder)), s.line()
    return time.perf_counter() - t0


def scaling(work: str, model: str, batch_size: int, small_n: int, large_n: int) -> list[dict[str, object]]:
    """Marginal rates: threads, 1 and 2 worker processes; worker start cost."""
    from distributed import LocalCluster

    from hoverlay.pipeline.models import load_model

    small = make_images(os.path.join(work, f"scale-{small_n}"), small_n, seed=2)
    large = make_images(os.path.join(work, f"scale-{large_n}"), large_n, seed=3)
    warm = make_images(os.path.join(work, "scale-warm"), 2 * batch_size, seed=4)
    rows: list[dict[str, object]] = []
    adapter = load_model(model)
    adapter.extract(np.zeros((batch_size, adapter.image_size, adapter.image_size, 3), np.uint8),
                    adapter.default_layers)
    store = os.path.join(work, "scale.zarr")
    t_s = _timed_build(small, store, model, batch_size)
    t_l = _timed_build(large, store, model, batch_size)
    rows.append({"case": "marginal: threaded build", "workers": 0, "small_s": t_s, "large_s": t_l,
                 "img_per_s": (large_n - small_n) / (t_l - t_s)})
    for k in (1, 2):
        t0 = time.perf_counter()
        with LocalCluster(n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            start = time.perf_counter() - t0
            addr = cluster.scheduler_address
            cold = _timed_build(warm, store, model, batch_size, scheduler=addr)  # loads the model
            hot = _timed_build(warm, store, model, batch_size, scheduler=addr)
            t_s = _timed_build(small, store, model, batch_size, scheduler=addr)
            t_l = _timed_build(large, store, model, batch_size, scheduler=addr)
        rows.append({"case": f"marginal: {k} Dask worker process(es), 1 thread each", "workers": k,
                     "small_s": t_s, "large_s": t_l, "img_per_s": (large_n - small_n) / (t_l - t_s),
                     "cluster_start_s": start, "first_build_extra_s": cold - hot})
    base = float(rows[0]["img_per_s"])  # type: ignore[arg-type]
    for row in rows:
        row["ratio_to_threads"] = float(row["img_per_s"]) / base  # type: ignore[arg-type]
    return rows


def s3_vs_local(work: str, model: str, batch_size: int, n: int) -> list[dict[str, object]]:
    """images/s of one threaded build: disk -> disk, and moto S3 -> moto S3 (same images)."""
    import socket

    folder = make_images(os.path.join(work, f"scale-{n}"), n, seed=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        import s3fs

        so = {"endpoint_url": f"http://127.0.0.1:{port}"}
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(**so)
        fs.mkdir("bench")
        fs.put(folder, "bench/images", recursive=True)
        t_local = _timed_build(folder, os.path.join(work, "local.zarr"), model, batch_size)
        t_s3 = _timed_build("s3://bench/images", "s3://bench/store.zarr", model, batch_size, storage_options=so)
    finally:
        proc.terminate()
        proc.wait(10)
    return [{"case": "threaded build, disk -> disk", "images": n, "img_per_s": n / t_local},
            {"case": "threaded build, moto S3 -> moto S3", "images": n, "img_per_s": n / t_s3,
             "ratio_to_threads": t_local / t_s3}]


def peak_rss_mb(folder: str, store: str, batch_size: int, index: bool) -> float:
    """Peak RSS of a fresh build process, read from /proc by the child itself (VmHWM)."""
    shutil.rmtree(store, ignore_errors=True)
    code = ("from hoverlay.pipeline.build import build; "
            f"build({folder!r}, {store!r}, batch_size={batch_size}, chunk={batch_size}, quiet=True, "
            f"index={index}); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--large", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--workdir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-processes", action="store_true", help="skip the 2-worker LocalCluster case")
    p.add_argument("--scaling", default=None, metavar="SMALL,LARGE",
                   help="marginal rates of threads and 1, 2 worker processes, worker start cost, S3 vs disk")
    p.add_argument("--only-scaling", action="store_true", help="skip P1 and P6")
    a = p.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="hoverlay-bench-")
    if a.scaling:
        small_n, large_n = (int(v) for v in a.scaling.split(","))
        rows_s = scaling(work, a.model, a.batch_size, small_n, large_n)
        rows_s += s3_vs_local(work, a.model, a.batch_size, small_n)
        report("pipeline-scaling", rows_s, {"target": {"2 workers / threads (marginal)": ">= 0.8"},
                                            "model": a.model, "batch_size": a.batch_size})
        if a.only_scaling:
            return
    small = make_images(os.path.join(work, "small"), a.images)
    rows = []
    bare = bare_forward(small, a.model, None, a.batch_size, a.device)
    threads = build_rate(small, os.path.join(work, "s-threads.zarr"), a.model, a.batch_size, a.device)
    rows.append({"case": "P1 bare forward", "images": a.images, "img_per_s": bare, "ratio": 1.0})
    rows.append({"case": "P1 hoverlay build (threads)", "images": a.images, "img_per_s": threads,
                 "ratio": threads / bare})
    if not a.no_processes:
        procs = build_rate(small, os.path.join(work, "s-procs.zarr"), a.model, a.batch_size, a.device,
                           scheduler="processes", workers=2)
        rows.append({"case": "P1 hoverlay build (2 Dask workers)", "images": a.images, "img_per_s": procs,
                     "ratio": procs / bare})
    if a.large:
        large = make_images(os.path.join(work, "large"), a.large, seed=1)
        for index in (False, True):
            what = "P6 build peak RSS" + (" (+ exact Flat index in RAM)" if index else " (no index)")
            rss_small = peak_rss_mb(small, os.path.join(work, f"rss-small-{index}.zarr"), a.batch_size, index)
            rss_large = peak_rss_mb(large, os.path.join(work, f"rss-large-{index}.zarr"), a.batch_size, index)
            rows.append({"case": what, "images": a.images, "rss_mb": rss_small})
            rows.append({"case": what, "images": a.large, "rss_mb": rss_large, "ratio": rss_large / rss_small})
    for row in rows:
        row["device"] = a.device
    report("pipeline" if a.device == "cpu" else f"pipeline-{a.device.replace(':', '')}", rows, {"target": {"P1_ratio": ">= 0.9", "P6": "flat in N"}})


if __name__ == "__main__":
    main()
