"""P1 and P6 for the pipeline, the marginal build ratio with its phase breakdown, store bytes.

Marginal ratio (``--marginal SMALL,LARGE``, results in ``pipeline-marginal.json``): the threaded
build's (LARGE − SMALL) / (t_LARGE − t_SMALL) ÷ the bare forward's, the two alternated run by run
(``--repeats``) so that the machine's load hits both; each repeat's ratio, their median and
spread, the load average, and where a build's time goes (seconds per phase per image, from the
builds' own clocks, large minus small; compression measured apart on the same data). The bare
forward is the loop a user would write (one thread, torch on every core); a second reference is
the forward as the build runs it (one 1-thread forward per core, at once).
Store bytes (``--bytes N``, ``pipeline-bytes.json``): bytes per image of the pixels under each
pixel codec and of each layer's vectors and norms, before (format 2: zstd pixels, blosc-zstd 3)
and after, on the scikit-image demo pictures and N generated photo-like images.
P1 (one run, start-up included): images/s of ``hoverlay build`` ÷ images/s of a bare torch loop
doing only the forward pass (same model, layers, batch size, pre-decoded inputs).
P6: peak RSS of a build subprocess for N and 10·N images (must stay flat).
Scaling (``--scaling SMALL,LARGE``, results in ``pipeline-scaling.json``): the *marginal*
embedding rate, (LARGE − SMALL) / (t_LARGE − t_SMALL), of the threaded build and of 1 and 2
local Dask worker processes (``LocalCluster``, one thread each, reached by address as a real
cluster is), all warm (model loaded), so start-up cancels out; what a worker costs to start
(cluster start, and the first build on fresh workers minus the same build warm); and images/s
of one threaded build from a moto S3 server into S3 vs from disk to disk (same images).

    python -m bench.pipeline [--images 200] [--large 2000] [--batch-size 16]
    python -m bench.pipeline --marginal 64,320 --repeats 3 --only   # the marginal ratio
    python -m bench.pipeline --scaling 40,160 --only                # workers
    python -m bench.pipeline --bytes 1000 --only                    # store bytes per image
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

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


def photo_like(rng: np.random.Generator, h: int = 480, w: int = 640) -> np.ndarray:
    """A generated photo-like RGB image: 1/f^a colour noise (natural images' spectrum), a few
    blended ellipses (objects, edges) and sensor noise (sigma 3). Nothing is downloaded."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** rng.uniform(1.0, 1.4)
        chans.append(np.fft.irfft2(spec, s=(h, w)))
    x = np.stack(chans, -1) @ (rng.normal(size=(3, 3)) * 0.4 + np.eye(3))
    x = (x - x.mean()) / (x.std() + 1e-9)
    img = 128 + 45 * x + rng.uniform(-40, 40, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(2, 7))):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, h / 3), rng.uniform(20, w / 3)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[m] = 0.6 * img[m] + 0.4 * rng.uniform(0, 255, 3) + 10 * x[m]
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_photos(folder: str, n: int, seed: int = 0) -> str:
    """n photo-like 640x480 JPEGs (quality 92, as a camera would save them)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        path = os.path.join(folder, f"{i:06d}.jpg")
        img = photo_like(rng)
        if not os.path.exists(path):
            Image.fromarray(img).save(path, quality=92)
    return folder


def _pixels_of(folder: str, size: int) -> np.ndarray:
    from hoverlay.pipeline.preprocess import load_pixels
    from hoverlay.pipeline.sources import read_bytes

    return np.stack([load_pixels(read_bytes(os.path.join(folder, f)), size) for f in sorted(os.listdir(folder))])


def _bare_seconds(adapter: Any, pixels: np.ndarray, layers: list[str], batch_size: int,
                  threads: int = 1) -> float:
    """Seconds of the forward alone over ``pixels``: one loop (torch on every core), or
    ``threads`` loops at once on 1-thread torch (the build's way)."""
    import torch

    from hoverlay.pipeline.tasks import pad_batch

    batches = [pad_batch(pixels[b:b + batch_size], batch_size) for b in range(0, len(pixels), batch_size)]
    before = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads))
    try:
        adapter.forward(batches[0], layers, concurrent=threads > 1)  # warm (allocator, threads)
        t0 = time.perf_counter()
        if threads == 1:
            for batch in batches:
                adapter.forward(batch, layers)
        else:
            def run(k: int) -> None:
                for batch in batches[k::threads]:
                    adapter.forward(batch, layers, concurrent=True)
            pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
            for th in pool:
                th.start()
            for th in pool:
                th.join()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def _build_once(folder: str, store: str, model: str, batch_size: int, **kw: Any) -> tuple[float, Any]:
    from hoverlay.pipeline.build import build

    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    s = build(folder, store, model=model, batch_size=batch_size, chunk=batch_size, index=False, quiet=True, **kw)
    return time.perf_counter() - t0, s


def _compression_ms(store: str) -> dict[str, float]:
    """ms of CPU per image of the store's codecs alone (no Zarr, no files), on its first shard:
    the pixel codec, and blosc-zstd on each layer's vectors and norms (as ``stores.writer``)."""
    import numcodecs

    from hoverlay.stores import open_store

    reader = open_store(store)
    n = min(reader.n_images, reader.attrs.chunk)
    pixels = reader.pixels(slice(0, n))
    codec = reader.attrs.pixels
    if codec.codec == "zstd":
        zstd = numcodecs.Zstd(level=3)
        encode = zstd.encode
    else:
        serializer = codec.zarr_codecs()["serializer"]
        encode = serializer._encode_image
    t = time.thread_time()
    for img in pixels:
        encode(np.ascontiguousarray(img))
    out = {"compress_pixels": (time.thread_time() - t) / n * 1e3}
    blosc = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)
    t = time.thread_time()
    for la in reader.layers:
        vec, nrm = reader.vectors(la, slice(0, n)), reader.norms(la, slice(0, n))
        for i in range(n):
            blosc.encode(np.ascontiguousarray(vec[i]))
        blosc.encode(np.ascontiguousarray(nrm))
    out["compress_vectors"] = (time.thread_time() - t) / n * 1e3
    return out


def _cpu_phases(small: str, large: str, store: str, model: str, batch_size: int, **build_kw: Any) -> dict[str, float]:
    """CPU ms per image of each phase (large minus small), from ``scheduler="sync"`` builds
    timed with ``process_time``: one task at a time, so a phase's CPU is its own (its Zarr and
    torch helper threads included) however loaded the machine is. The forward runs on every core
    here; its CPU per image is what the threaded build's overlapping 1-thread forwards need too."""
    from hoverlay.pipeline import phases

    n_s, n_l = len(os.listdir(small)), len(os.listdir(large))
    phases.CLOCK = time.process_time
    try:
        c0 = time.process_time()
        _, s_small = _build_once(small, store, model, batch_size, scheduler="sync", **build_kw)
        c1 = time.process_time()
        _, s_large = _build_once(large, store, model, batch_size, scheduler="sync", **build_kw)
        c2 = time.process_time()
    finally:
        phases.CLOCK = time.perf_counter
    out = {p: (s_large.phases.get(p, 0.0) - s_small.phases.get(p, 0.0)) / (n_l - n_s) * 1e3
           for p in phases.PHASES if p not in ("dask", "hash", "table")}
    out["whole build"] = ((c2 - c1) - (c1 - c0)) / (n_l - n_s) * 1e3
    out["other (hash, table, commit, Python)"] = out["whole build"] - sum(
        v for k, v in out.items() if k != "whole build")
    return out


def marginal(work: str, model: str, batch_size: int, small_n: int, large_n: int, repeats: int,
             **build_kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The threaded build's marginal rate ÷ the bare forward's, alternated ``repeats`` times."""
    from hoverlay.pipeline.models import load_model
    from hoverlay.pipeline.phases import PHASES

    small = make_images(os.path.join(work, f"m-{small_n}"), small_n, seed=6)
    large = make_images(os.path.join(work, f"m-{large_n}"), large_n, seed=7)
    adapter = load_model(model)
    layers = adapter.default_layers
    px_s, px_l = _pixels_of(small, adapter.image_size), _pixels_of(large, adapter.image_size)
    store = os.path.join(work, "marginal.zarr")
    _build_once(small, store, model, batch_size, **build_kw)  # warm: model, tracing, imports
    rows: list[dict[str, Any]] = []
    phase_ms: dict[str, list[float]] = {p: [] for p in PHASES}
    d = large_n - small_n
    for r in range(repeats):
        load = os.getloadavg()[0]
        bare_s = _bare_seconds(adapter, px_s, layers, batch_size)
        t_s, sum_s = _build_once(small, store, model, batch_size, **build_kw)
        bare_l = _bare_seconds(adapter, px_l, layers, batch_size)
        t_l, sum_l = _build_once(large, store, model, batch_size, **build_kw)
        bare2_s = _bare_seconds(adapter, px_s, layers, batch_size, threads=2)
        bare2_l = _bare_seconds(adapter, px_l, layers, batch_size, threads=2)
        bare, bare2, built = d / (bare_l - bare_s), d / (bare2_l - bare2_s), d / (t_l - t_s)
        rows.append({"repeat": r, "load_1min": round(load, 2), "bare_img_s": bare, "bare_2x1_img_s": bare2,
                     "build_img_s": built, "ratio": built / bare, "ratio_to_2x1": built / bare2})
        for p in phase_ms:
            phase_ms[p].append((sum_l.phases.get(p, 0.0) - sum_s.phases.get(p, 0.0)) / d * 1e3)
    cpu = _cpu_phases(small, large, store, model, batch_size, **build_kw)
    ratios = [row["ratio"] for row in rows]
    summary = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "ratio_to_2x1_median": statistics.median(row["ratio_to_2x1"] for row in rows),
               "phase_ms_per_image": {p: statistics.median(v) for p, v in phase_ms.items()},
               "phase_cpu_ms_per_image": cpu,
               "compression_ms_per_image": _compression_ms(store), "small": small_n, "large": large_n,
               "repeats": repeats, "build_options": build_kw}
    summary["phase_ms_per_image"]["forward_bare"] = 1e3 / statistics.median(row["bare_img_s"] for row in rows)
    return rows, summary


def store_bytes(work: str, model: str, batch_size: int, n_photos: int) -> list[dict[str, Any]]:
    """Bytes per image, before (format 2) and after, for the demo pictures and n photo-like ones.

    One build per image set with lossless zstd pixels (the exact model input); each pixel codec's
    bytes come from writing those pixels into an array of that codec (same shards, real files),
    and format 2's vector bytes from writing the vectors with its blosc-zstd level 3."""
    import zarr
    import zarr.codecs

    from hoverlay.pipeline.demo import copy_demo_images
    from hoverlay.stores import open_store
    from hoverlay.stores.format import PIXELS, layer_path
    from hoverlay.stores.info import store_size_bytes
    from hoverlay.stores.pixels import PixelCodec

    sets = {"demo (scikit-image)": copy_demo_images(os.path.join(work, "demo")),
            f"{n_photos} photo-like": make_photos(os.path.join(work, f"photos-{n_photos}"), n_photos, seed=8)}
    codecs = [PixelCodec("zstd", "lossless"), PixelCodec("jpeg", 90), PixelCodec("jpeg", 75),
              PixelCodec("webp", 85), PixelCodec("avif", 60), PixelCodec("jpeg", "lossless"),
              PixelCodec("webp", "lossless")]
    rows: list[dict[str, Any]] = []
    for name, folder in sets.items():
        store = os.path.join(work, "bytes.zarr")
        _build_once(folder, store, model, batch_size, pixel_codec="zstd")
        reader = open_store(store)
        n = reader.n_images

        def du(path: str, url: str = store) -> int:
            return store_size_bytes(os.path.join(url, path))

        vectors = {la: du(layer_path(la, "vectors")) / n for la in reader.layers}
        norms = sum(du(layer_path(la, "norms")) for la in reader.layers) / n
        table = (du("images/table") + du("images/metadata")) / n
        side = zarr.open_group(os.path.join(work, "side.zarr"), mode="w", zarr_format=3)
        old_vectors = 0.0
        for la in reader.layers:
            v = reader.vectors(la, slice(None))
            arr = side.create_array(f"v{la}", shape=v.shape, dtype="float16", chunks=(1, *v.shape[1:]),
                                    shards=(reader.attrs.chunk, *v.shape[1:]),
                                    compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
            arr[:] = v
            old_vectors += store_size_bytes(os.path.join(work, "side.zarr", f"v{la}")) / n
        pixels = reader.pixels(slice(None))
        vec_total = sum(vectors.values())
        for codec in codecs:
            arr = side.create_array(f"p-{codec.codec}-{codec.quality}", shape=pixels.shape, dtype="uint8",
                                    chunks=(1, *pixels.shape[1:]), shards=(reader.attrs.chunk, *pixels.shape[1:]),
                                    fill_value=0, **codec.zarr_codecs())
            t = time.perf_counter()
            arr[:] = pixels
            enc_ms = (time.perf_counter() - t) / n * 1e3
            back = np.asarray(arr[:])
            px_bytes = store_size_bytes(os.path.join(work, "side.zarr", f"p-{codec.codec}-{codec.quality}")) / n
            err = np.abs(back.astype(np.int16) - pixels).astype(np.float64)
            mse = float(np.mean(err ** 2))
            total = px_bytes + vec_total + norms + table
            rows.append({"images": name, "n": n, "pixels": codec.describe(), "pixel_B": round(px_bytes),
                         **{f"vectors {la} B": round(b) for la, b in vectors.items()}, "norms_B": round(norms),
                         "table_B": round(table), "total_B": round(total), "total/vectors": total / vec_total,
                         "pixel_mean_abs_err": float(err.mean()), "pixel_max_err": int(err.max()),
                         "psnr_db": 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse), "write_ms": enc_ms})
        before_total = rows[-len(codecs)]["pixel_B"] + old_vectors + norms + table
        rows.append({"images": name, "n": n, "pixels": "format 2 (before): zstd pixels, blosc-zstd 3 vectors",
                     "pixel_B": rows[-len(codecs)]["pixel_B"], "vectors_all_B": round(old_vectors),
                     "norms_B": round(norms), "table_B": round(table), "total_B": round(before_total),
                     "total/vectors": before_total / old_vectors})
        shutil.rmtree(os.path.join(work, "side.zarr"), ignore_errors=True)
        _ = PIXELS
    return rows


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


def scaling(work: str, model: str, batch_size: int, small_n: int, large_n: int,
            repeats: int = 2) -> list[dict[str, object]]:
    """Marginal rates: threads, 1 and 2 worker processes (``repeats`` each, alternated with the
    threaded build on the same cluster's lifetime); worker start cost."""
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
    d = large_n - small_n
    threaded: list[float] = []

    def threads_rate() -> float:
        t_s = _timed_build(small, store, model, batch_size)
        t_l = _timed_build(large, store, model, batch_size)
        threaded.append(d / (t_l - t_s))
        return threaded[-1]

    threads_rate()
    for k in (1, 2):
        t0 = time.perf_counter()
        with LocalCluster(n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            start = time.perf_counter() - t0
            addr = cluster.scheduler_address
            cold = _timed_build(warm, store, model, batch_size, scheduler=addr)  # loads the model
            hot = _timed_build(warm, store, model, batch_size, scheduler=addr)
            rates, ratios = [], []
            for _ in range(repeats):
                t_s = _timed_build(small, store, model, batch_size, scheduler=addr)
                t_l = _timed_build(large, store, model, batch_size, scheduler=addr)
                rates.append(d / (t_l - t_s))
                ratios.append(rates[-1] / threads_rate())  # the threaded build right after
        rows.append({"case": f"marginal: {k} Dask worker process(es), 1 thread each", "workers": k,
                     "img_per_s": statistics.median(rates), "img_per_s_all": [round(r, 2) for r in rates],
                     "ratio_to_threads": statistics.median(ratios),
                     "ratio_all": [round(r, 3) for r in ratios], "load_1min": round(os.getloadavg()[0], 2),
                     "cluster_start_s": start, "first_build_extra_s": cold - hot})
    rows.insert(0, {"case": "marginal: threaded build", "workers": 0, "img_per_s": statistics.median(threaded),
                    "img_per_s_all": [round(r, 2) for r in threaded], "ratio_to_threads": 1.0})
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
    p.add_argument("--marginal", default=None, metavar="SMALL,LARGE",
                   help="the threaded build's marginal ratio to the bare forward and its phases "
                        "(default 64,320 unless --only)")
    p.add_argument("--repeats", type=int, default=3, help="alternated repeats of the marginal ratio")
    p.add_argument("--scaling", default=None, metavar="SMALL,LARGE",
                   help="marginal rates of threads and 1, 2 worker processes, worker start cost, S3 vs disk")
    p.add_argument("--bytes", type=int, default=None, metavar="N",
                   help="store bytes per image: the demo pictures and N generated photo-like images")
    p.add_argument("--only", "--only-scaling", action="store_true",
                   help="only the parts asked for (--marginal when given, --scaling, --bytes): skip P1 and P6")
    a = p.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="hoverlay-bench-")
    sizes = a.marginal or (None if a.only else "64,320")
    if sizes:
        small_n, large_n = (int(v) for v in sizes.split(","))
        rows_m, summary = marginal(work, a.model, a.batch_size, small_n, large_n, a.repeats)
        report("pipeline-marginal", rows_m, {"target": {"marginal build / bare forward": ">= 0.95"},
                                             "model": a.model, "batch_size": a.batch_size, **summary})
        print("phases (threaded build, wall ms per image and thread):",
              {k: round(v, 2) for k, v in summary["phase_ms_per_image"].items()})
        print("phases (sync build, CPU ms per image):",
              {k: round(v, 2) for k, v in summary["phase_cpu_ms_per_image"].items()})
        print("compression alone, ms per image:", {k: round(v, 2) for k, v in summary["compression_ms_per_image"].items()})
        print(f"ratio median {summary['ratio_median']:.3f} (min {summary['ratio_min']:.3f}, max "
              f"{summary['ratio_max']:.3f}); to the 2x1-thread forward {summary['ratio_to_2x1_median']:.3f}")
    if a.scaling:
        small_n, large_n = (int(v) for v in a.scaling.split(","))
        rows_s = scaling(work, a.model, a.batch_size, small_n, large_n)
        rows_s += s3_vs_local(work, a.model, a.batch_size, small_n)
        report("pipeline-scaling", rows_s, {"target": {"2 workers / threads (marginal)": ">= 0.8"},
                                            "model": a.model, "batch_size": a.batch_size})
    if a.bytes:
        report("pipeline-bytes", store_bytes(work, a.model, a.batch_size, a.bytes),
               {"target": {"store / its vectors": "<= 1.2"}, "model": a.model})
    if a.only:
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
