"""Shared fixtures: small real inputs (generated images, scikit-image demo files), Chromium, and
the S3 tests' moto server and process launcher (tests/s3cluster.py)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

# ``make test`` runs the suite in two pytest-xdist worker processes on a 2-core machine: each
# worker's torch (and its subprocesses') then use one core: with two 2-thread OpenMP teams on
# two cores a feature-visualisation test took 93 s instead of 7 (taken to be the teams spinning).
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

#: Debian's chromium drives the browser tests (playwright cannot download browsers offline).
CHROMIUM = os.environ.get("HOVERLAY_CHROMIUM", "/usr/bin/chromium")


def write_generated_images(folder: str, n: int, seed: int = 0, size: tuple[int, int] = (96, 80),
                           label: str = "gen") -> list[str]:
    """n distinct small RGB PNGs in folder/label/ (distinct content -> distinct hashes)."""
    rng = np.random.default_rng(seed)
    out = []
    os.makedirs(os.path.join(folder, label), exist_ok=True)
    for i in range(n):
        yy, xx = np.mgrid[0:size[1], 0:size[0]]
        base = rng.integers(0, 255, size=3)
        img = (base + 60 * np.sin((xx * (i + 1) + yy * rng.integers(1, 5)) / 7.0)[..., None]) % 255
        path = os.path.join(folder, label, f"img_{seed}_{i:04d}.png")
        Image.fromarray(img.astype(np.uint8)).save(path)
        out.append(path)
    return out


def modules_after(code: str) -> set[str]:
    """Modules loaded after running ``code`` in a fresh interpreter (tests/ on its path, run from
    there, so the repository's top-level folders cannot be imported by accident)."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True, cwd=tests,
                         env={**os.environ, "PYTHONPATH": tests}).stdout
    return set(out.split())


@pytest.fixture
def generated_images(tmp_path):
    def make(n: int, seed: int = 0, sub: str = "images", label: str = "gen") -> str:
        folder = str(tmp_path / sub)
        write_generated_images(folder, n, seed=seed, label=label)
        return folder
    return make


@pytest.fixture(scope="session")
def demo_subset(tmp_path_factory) -> str:
    """Four scikit-image demo images in label folders (chelsea among them)."""
    from hoverlay.pipeline.demo import skimage_data_dir

    root = tmp_path_factory.mktemp("demo")
    for label, name in [("animals", "chelsea.png"), ("people", "astronaut.png"),
                        ("objects", "coffee.png"), ("objects", "rocket.jpg")]:
        os.makedirs(root / label, exist_ok=True)
        shutil.copyfile(os.path.join(skimage_data_dir(), name), root / label / name)
    return str(root)


@pytest.fixture(scope="session")
def demo_store(demo_subset, tmp_path_factory) -> str:
    """A real store built by the pipeline from the demo subset with the default model."""
    from hoverlay.pipeline.build import build

    path = str(tmp_path_factory.mktemp("stores") / "demo.zarr")
    # lossless pixels: tests recompute activations from the stored pixels (JPEG, the build's
    # default, keeps a lossy copy of what the model saw)
    build(demo_subset, path, quiet=True, pixel_codec="zstd")
    return path


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per browser-test module (tests/ui; they skip without Chromium).

    Every page it opens reports its uncaught errors to ``page_errors`` (checked after each test
    by :func:`no_uncaught_page_errors`): an error thrown while a page applies a server message
    leaves that message's later changes unmade, whatever the test looked at."""
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        b.page_errors = []
        watch = lambda pg: pg.on("pageerror", lambda err: b.page_errors.append(f"{err}\n{err.stack}"))  # noqa: E731
        new_context, new_page = b.new_context, b.new_page

        def watched_context(*args, **kwargs):
            ctx = new_context(*args, **kwargs)
            ctx.on("page", watch)
            return ctx

        def watched_page(*args, **kwargs):
            pg = new_page(*args, **kwargs)
            watch(pg)
            return pg

        b.new_context, b.new_page = watched_context, watched_page
        yield b
        b.close()


@pytest.fixture(autouse=True)
def no_uncaught_page_errors(request):
    """A browser test fails when a page it opened threw an error nobody caught."""
    if "browser" not in request.fixturenames:
        yield
        return
    errors = request.getfixturevalue("browser").page_errors
    errors.clear()
    yield
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server for the session's S3 tests (tests/s3cluster.py); each test uses its
    own keys in the bucket ``hoverlay``. Skips without moto[server] and s3fs."""
    pytest.importorskip("s3fs")
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "moto_server")):
        pytest.skip("moto[server] is not installed")
    from s3cluster import S3Server

    server = S3Server(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def forker(s3_server, tmp_path_factory):
    """The session's forking launcher of separate processes (tests/s3cluster.py), started at
    once so its imports overlap whatever the first test does before it forks a child."""
    pytest.importorskip("distributed")
    from s3cluster import Forker

    f = Forker(tmp_path_factory.mktemp("forked"))
    try:
        yield f
    finally:
        f.close()
