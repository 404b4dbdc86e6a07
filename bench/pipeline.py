"""P1 and P6 for the pipeline.

P1: images/s of ``hoverlay build`` ÷ images/s of a bare torch loop doing only the forward pass
(same model, layers, batch size, pre-decoded inputs), measured in one run. Target ≥ 0.9.
P6: peak RSS of a build subprocess for N and 10·N images (must stay flat).

    python -m bench.pipeline [--images 200] [--large 2000] [--batch-size 16]
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
    a = p.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="hoverlay-bench-")
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
