"""Query with any image (#15): ``hoverlay query``, the shared upload validator, the model worker.

Real stores built by the pipeline (a seeded random resnet18 at 64 px, and EfficientNet-Lite0 on
scikit-image's demo images for the one test that needs a trained network), a real worker
process, real bad files. Nothing is mocked.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import modules_after, write_generated_images
from PIL import Image

from hoverlay.cli import main
from hoverlay.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE
from hoverlay.explorer.query_worker import (
    ModelUnavailableError,
    QueryBusyError,
    QueryTimeoutError,
    QueryWorker,
    QueryWorkerConfig,
    public_text,
)
from hoverlay.pipeline.build import build
from hoverlay.stores import open_store
from hoverlay.stores.exports import read_hits
from hoverlay.stores.uploads import UploadError, read_upload, resolve_allowed_path, validate_upload

TESTS = str(Path(__file__).resolve().parent)
R18 = {"model": "torchvision:resnet18", "weights": "none", "layers": ["layer2", "layer3"], "size": 64,
       "quiet": True}


def tiny_model():
    """python:test_query:tiny_model: two convs, so a store with a weights file builds in a second."""
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 2, stride=2), nn.ReLU())


class _Sleepy:
    """python:test_query:sleepy_model: a conv whose forward on one real image (a query; builds and
    layer surveys run batches, the geometry probe is all black) takes 60 s: a worker stuck on it."""

    def __new__(cls):  # type: ignore[misc]
        import torch
        import torch.nn as nn

        class Sleepy(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 4, stride=4)

            def forward(self, x):
                if x.shape[0] == 1 and float(x[0, 0].std()) > 1e-3:  # not the all-black geometry probe
                    time.sleep(60)
                return torch.relu(self.conv(x))

        return Sleepy()


sleepy_model = _Sleepy


# ================================================================================== fixtures
@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> dict[str, str]:
    """A store of 8 generated images and a 512-px JPEG (draft-decoded by the build: the query
    must decode it the same way), resnet18 (seeded random weights), layers layer2/layer3."""
    from hoverlay.pipeline.demo import skimage_data_dir

    root = tmp_path_factory.mktemp("r18")
    write_generated_images(str(root / "images"), 8, seed=11)
    Image.open(os.path.join(skimage_data_dir(), "astronaut.png")).convert("RGB").save(
        root / "images" / "gen" / "zz_astronaut.jpg", quality=90)
    store = str(root / "store.zarr")
    build(str(root / "images"), store, **R18)
    return {"store": store, "images": str(root / "images" / "gen"), "root": str(root)}


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> str:
    """A store whose model's weights file is gone (built, then the state dict deleted)."""
    import torch

    root = tmp_path_factory.mktemp("broken")
    write_generated_images(str(root / "images"), 3, seed=5)
    weights = root / "secret-folder" / "tiny.pt"
    weights.parent.mkdir()
    torch.save(tiny_model().state_dict(), weights)
    store = str(root / "store.zarr")
    build(str(root / "images"), store, model="python:test_query:tiny_model", weights=str(weights),
          layers=["1", "3"], size=64, quiet=True, index=False)
    weights.unlink()
    return store


@pytest.fixture(scope="module")
def worker():
    w = QueryWorker(QueryWorkerConfig(threads=1, timeout=120.0, env={"PYTHONPATH": TESTS}))
    yield w
    w.close()


def store_files(store: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of a store: a query must leave them all as they were."""
    out = {}
    for d, _, files in os.walk(store):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, store)] = (st.st_size, st.st_mtime_ns)
    return out


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_of_size(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid grayscale PNG header declaring width x height; ``rows`` rows of zero pixels follow
    (all of them: a real decompression bomb, ~0.1% of its decoded size; None: one row only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    n_rows = height if rows is None else rows
    raw = zlib.compress(b"\x00" * ((width + 1) * n_rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@functools.lru_cache(maxsize=1)
def bad_uploads() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the UploadError problem they must give)."""
    rng = np.random.default_rng(0)
    good_png = png_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    return {
        "notes.txt": (b"this is not an image, just some text\n" * 20, "not-an-image"),
        "empty.png": (b"", "empty"),
        "cut.png": (good_png[: len(good_png) // 2], "truncated"),
        "cut.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
        "bomb.png": (png_of_size(9000, 9000), "bomb"),            # 81 Mpx: over our 64M limit
        "huge.png": (png_of_size(20000, 20000, rows=1), "bomb"),  # Pillow's own bomb error
        "big.png": (b"\x89PNG" + b"\x00" * (2 * 2**20), "too-large"),  # over a 1 MiB limit
    }


# ===================================================================================== CLI
def test_cli_query_of_a_stored_images_own_file_finds_that_patch_first(r18, tmp_path, capsys):
    before = store_files(r18["store"])
    image = os.path.join(r18["images"], "img_11_0005.png")
    out = tmp_path / "hits.csv"
    assert main(["query", image, "--store", r18["store"], "--layer", "layer2", "--y", "3", "--x", "5",
                 "-k", "6", "--out", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"query {image} at patch (y=3, x=5) of layer layer2 (grid 8x8)")
    first = printed[2].split()
    assert first[:5] == ["1", first[1], "5", "3", "5"] and float(first[1]) > 0.999, printed[:4]
    hits = read_hits(out)
    assert len(hits["rank"]) == 6 and hits["query_source"][0] == image
    assert [int(hits[c][0]) for c in ("image", "y", "x")] == [5, 3, 5] and float(hits["score"][0]) > 0.999
    assert store_files(r18["store"]) == before  # nothing written to the store
    jpeg = os.path.join(r18["images"], "zz_astronaut.jpg")
    assert main(["query", jpeg, "--store", r18["store"], "--layer", "layer2", "--y", "2", "--x", "6"]) == EXIT_OK
    first = capsys.readouterr().out.splitlines()[2].split()
    assert first[2:5] == ["8", "2", "6"] and float(first[1]) > 0.999

    # the Python API: the default patch is the centre of the deepest layer; a box averages cells
    from hoverlay.pipeline.query import query_image

    res = query_image(image, r18["store"], k=3)
    assert (res.layer, res.y, res.x) == ("layer3", 2, 2) and res.cells == [(2, 2)]
    assert int(res.hits["image"][0]) == 5 and float(res.hits["score"][0]) > 0.999
    assert res.method in ("index + exact re-rank", "exact scan")
    whole = query_image(image, r18["store"], layer="layer3", box=(0, 0, 96, 80), k=1)
    assert len(whole.cells) == 16  # the box covers the whole centre crop: every cell of 4x4
    assert int(whole.hits["image"][0]) == 5


def test_cli_query_usage_and_bad_files_are_one_line_and_write_nothing(r18, tmp_path, capsys):
    image = os.path.join(r18["images"], "img_11_0001.png")
    before = store_files(r18["store"])
    assert main(["query", image, "--store", r18["store"], "--y", "1"]) == EXIT_USAGE
    assert "give both --y and --x" in capsys.readouterr().err
    assert main(["query", image, "--store", r18["store"], "--layer", "layer3", "--y", "9", "--x", "0"]) == EXIT_USAGE
    assert "outside the 4x4 grid of layer 'layer3'" in capsys.readouterr().err
    assert main(["query", image, "--store", r18["store"], "--box", "1,2,3"]) == EXIT_USAGE
    assert "--box" in capsys.readouterr().err
    for name, (data, problem) in bad_uploads().items():
        path = tmp_path / name
        path.write_bytes(data)
        out = tmp_path / f"{name}.csv"
        code = main(["query", str(path), "--store", r18["store"], "--out", str(out), "--max-bytes", "1M"])
        err = capsys.readouterr().err
        assert code == EXIT_INPUT, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("hoverlay query: "), err
        assert name in err and not out.exists()
        with pytest.raises(UploadError) as info:
            read_upload(path, max_bytes=2**20)
        assert info.value.problem == problem, (name, str(info.value))
    assert main(["query", str(tmp_path / "missing.png"), "--store", r18["store"]]) == EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err
    assert store_files(r18["store"]) == before


def test_the_upload_validator_names_each_problem_and_no_server_path(tmp_path):
    from hoverlay.pipeline.options import MAX_PIXELS
    from hoverlay.stores.uploads import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == MAX_PIXELS  # the explorer refuses what a build refuses
    for name, (data, problem) in bad_uploads().items():
        with pytest.raises(UploadError) as info:
            validate_upload(data, name=name, max_bytes=2**20)
        assert info.value.problem == problem and name in str(info.value) and "\n" not in str(info.value)
    # an explicit pixel limit, whatever Pillow's process-wide MAX_IMAGE_PIXELS says
    small = png_bytes(np.zeros((40, 50, 3), np.uint8))
    assert validate_upload(small).width == 50
    with pytest.raises(UploadError, match="2,000 pixels, over the 1,000-pixel limit"):
        validate_upload(small, name="x.png", max_pixels=1000)
    # the allow-list: inside a folder only, links and .. resolved first
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(small)
    (tmp_path / "outside.png").write_bytes(small)
    (allowed / "link.png").symlink_to(tmp_path / "outside.png")
    assert resolve_allowed_path("a.png", [allowed]) == str((allowed / "a.png").resolve())
    for sneaky in ("../outside.png", "link.png", str(tmp_path / "outside.png"), "/etc/passwd"):
        with pytest.raises(UploadError) as info:
            resolve_allowed_path(sneaky, [allowed])
        assert str(tmp_path) not in str(info.value)
    with pytest.raises(UploadError, match="not enabled"):
        resolve_allowed_path("a.png", [])
    assert public_text("weights file '/srv/models/private/r18.pt' not found") == "weights file 'r18.pt' not found"


# ================================================================================== worker
def test_worker_vectors_equal_a_direct_forward_pass_and_the_store(r18, worker):
    from hoverlay.pipeline.preprocess import load_pixels
    from hoverlay.pipeline.query import load_store_model
    from hoverlay.stores import normalize_patches

    path = os.path.join(r18["images"], "img_11_0002.png")
    data = Path(path).read_bytes()
    got = worker.submit(data, r18["store"], ["layer2", "layer3"], name="img.png").result(180)
    model = load_store_model(r18["store"])
    pixels = load_pixels(data, model.size)
    assert np.array_equal(got.pixels, pixels)
    direct = model.adapter.extract(pixels[None], ["layer2", "layer3"])
    reader = open_store(r18["store"])
    for layer in ("layer2", "layer3"):
        unit, norms = normalize_patches(direct[layer][0])
        vec, g = got.layers[layer].vectors, reader.geometry(layer)
        assert vec.dtype == np.float16 and vec.shape == unit.shape == (g.height, g.width, g.dim)
        assert np.abs(vec.astype(np.float32) - unit.astype(np.float32)).max() <= 1e-3
        assert np.allclose(got.layers[layer].norms, norms, rtol=1e-3)
        stored = reader.vectors(layer, [2])[0].astype(np.float32)  # the build padded its batch
        assert np.abs(vec.astype(np.float32) - stored).max() <= 2e-3
    assert set(got.timings) >= {"decode", "forward"}
    # a JPEG the build decoded at a reduced DCT scale (the store's jpeg_draft): the same vectors
    assert model.draft_to is not None
    jpeg = worker.embed(Path(r18["images"], "zz_astronaut.jpg").read_bytes(), r18["store"], ["layer3"])
    stored = reader.vectors("layer3", [8])[0].astype(np.float32)
    assert np.abs(jpeg.layers["layer3"].vectors.astype(np.float32) - stored).max() <= 2e-3
    # only the layers asked for come back
    assert list(worker.embed(data, r18["store"], ["layer3"]).layers) == ["layer3"]


def test_the_explorer_side_has_no_torch_after_a_worker_request(r18):
    code = f"""
import sys
from hoverlay.explorer.query_worker import QueryWorker, QueryWorkerConfig
w = QueryWorker(QueryWorkerConfig(threads=1))
data = open({os.path.join(r18['images'], 'img_11_0003.png')!r}, 'rb').read()
got = w.embed(data, {r18['store']!r}, ['layer3'])
assert got.layers['layer3'].vectors.shape == (4, 4, 256), got.layers['layer3'].vectors.shape
w.close()
"""
    mods = modules_after(code)
    assert "hoverlay.explorer.query_worker" in mods
    assert not {"torch", "torchvision", "hoverlay.pipeline"} & mods


def test_bad_uploads_to_the_worker_fail_cleanly_and_it_keeps_working(r18, worker):
    before = store_files(r18["store"])
    config = worker.config
    for name, (data, problem) in bad_uploads().items():
        if problem == "too-large":
            data = b"\x89PNG" + b"\x00" * (config.max_bytes + 1)
        for validate in (True, False):  # checked here, and again by the worker's decode
            with pytest.raises(UploadError) as info:
                worker.submit(data, r18["store"], name=name, validate=validate).result(120)
            assert info.value.problem == problem and name in info.value.public
            assert r18["root"] not in info.value.public
    good = Path(r18["images"], "img_11_0004.png").read_bytes()
    assert worker.embed(good, r18["store"], ["layer3"]).layers["layer3"].vectors.shape == (4, 4, 256)
    assert store_files(r18["store"]) == before


def test_a_store_whose_weights_cannot_load_says_so_and_others_keep_working(r18, broken, worker):
    data = Path(r18["images"], "img_11_0000.png").read_bytes()
    with pytest.raises(ModelUnavailableError) as info:
        worker.submit(data, broken).result(120)
    message = info.value.public
    assert "cannot be loaded here" in message and "tiny.pt" in message and "not found" in message
    assert "secret-folder" not in message and "secret-folder" in str(info.value)  # the log has the path
    t = time.perf_counter()
    with pytest.raises(ModelUnavailableError):  # remembered: not retried for every upload
        worker.submit(data, broken).result(120)
    assert time.perf_counter() - t < 5
    assert worker.embed(data, r18["store"]).layers["layer2"].vectors.shape == (8, 8, 128)


def test_a_request_over_its_timeout_fails_cleanly_then_the_next_one_works(r18, worker):
    rng = np.random.default_rng(1)
    large = png_bytes(rng.integers(0, 255, (2400, 2400, 3), dtype=np.uint8))  # ~0.3 s to decode
    good = Path(r18["images"], "img_11_0006.png").read_bytes()
    worker.embed(good, r18["store"])  # warm
    t = time.perf_counter()
    with pytest.raises(QueryTimeoutError, match="within 0.05 s"):
        worker.submit(large, r18["store"], timeout=0.05).result(60)
    assert time.perf_counter() - t < 2
    assert worker.embed(good, r18["store"], ["layer2"]).layers["layer2"].vectors.shape == (8, 8, 128)
    assert worker.stats["timeouts"] >= 1 and worker.pid is not None


def test_a_full_queue_refuses_at_once(r18, worker):
    good = Path(r18["images"], "img_11_0006.png").read_bytes()
    futures = [worker.submit(good, r18["store"], ["layer3"]) for _ in range(worker.config.queue)]
    with pytest.raises(QueryBusyError, match="busy"):
        worker.submit(good, r18["store"]).result(1)
    assert all(f.result(120).layers["layer3"].vectors.shape == (4, 4, 256) for f in futures)
    # sessions share it: threads submitting at once each get their own image's vectors back
    from concurrent.futures import ThreadPoolExecutor

    files = [Path(r18["images"], f"img_11_000{i}.png").read_bytes() for i in range(4)]
    reader = open_store(r18["store"])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: worker.embed(files[i % 4], r18["store"], ["layer2"]), range(8)))
    for i, emb in enumerate(got):
        stored = reader.vectors("layer2", [i % 4])[0].astype(np.float32)
        assert np.abs(emb.layers["layer2"].vectors.astype(np.float32) - stored).max() <= 2e-3


def test_a_worker_stuck_past_the_timeout_is_killed_and_the_next_request_restarts_it(r18, tmp_path):
    """The stuck request times out at its deadline; ``kill_grace`` later the worker is killed,
    failing the request queued behind it; the next request starts a new worker."""
    write_generated_images(str(tmp_path / "images"), 2, seed=9)
    slow = str(tmp_path / "slow.zarr")
    build(str(tmp_path / "images"), slow, model="python:test_query:sleepy_model", layers=["conv"], size=32,
          quiet=True, index=False, batch_size=2)
    w = QueryWorker(QueryWorkerConfig(threads=1, timeout=120.0, kill_grace=1.0, env={"PYTHONPATH": TESTS}))
    try:
        assert w.warm(slow).result(180)["layers"] == ["conv"]
        first_pid = w.pid
        good = Path(r18["images"], "img_11_0001.png").read_bytes()
        t = time.perf_counter()
        stuck = w.submit(good, slow, timeout=0.5)
        black = png_bytes(np.zeros((32, 32, 3), np.uint8))  # a forward without the sleep
        behind = w.submit(black, slow)  # queued behind the stuck one: fails with the worker
        with pytest.raises(QueryTimeoutError, match="while computing"):
            stuck.result(30)
        from hoverlay.explorer.query_worker import WorkerFailedError

        with pytest.raises(WorkerFailedError, match="stopped"):
            behind.result(30)
        assert time.perf_counter() - t < 20 and w.stats["kills"] == 1
        again = w.embed(black, slow)  # a new worker
        assert again.layers["conv"].vectors.shape == (8, 8, 8) and w.pid != first_pid
    finally:
        w.close()


def test_serve_flags_make_the_worker_config():
    from hoverlay.cli import command_parser

    args = command_parser("serve").parse_args(["s.zarr", "--query-timeout", "5", "--upload-max-bytes", "8M",
                                               "--query-queue", "3", "--query-worker-start"])
    config = QueryWorkerConfig.from_args(args)
    assert (config.timeout, config.max_bytes, config.queue) == (5.0, 8 * 10**6, 3) and args.query_worker_start
    assert QueryWorkerConfig.from_args(command_parser("serve").parse_args(["s.zarr"])) == QueryWorkerConfig()


# ============================================================ a trained net, a new picture
@pytest.fixture(scope="module")
def demo_full(tmp_path_factory) -> tuple[str, str]:
    """Every scikit-image demo image (15, in label folders) in an EfficientNet-Lite0 store."""
    from hoverlay.pipeline.demo import copy_demo_images

    root = tmp_path_factory.mktemp("demo-full")
    images = copy_demo_images(root / "images")
    store = str(root / "store.zarr")
    build(images, store, quiet=True)
    return store, images


@pytest.mark.slow
def test_a_rotated_cropped_copy_finds_its_original(demo_full, tmp_path):
    from hoverlay.pipeline.query import load_store_model, query_image

    store, images = demo_full
    reader = open_store(store)
    sources = list(reader.table()["source"])
    model = load_store_model(reader)
    for label, name, angle in (("animals", "chelsea.png", 12), ("people", "astronaut.png", -15),
                               ("objects", "coffee.png", 20)):
        img = Image.open(os.path.join(images, label, name)).convert("RGB")
        w, h = img.size
        copy = img.rotate(angle, resample=Image.Resampling.BICUBIC).crop(
            (int(0.15 * w), int(0.12 * h), int(0.85 * w), int(0.9 * h)))
        path = tmp_path / f"new-{name}"
        copy.save(path)
        original = next(i for i, s in enumerate(sources) if s.endswith(f"/{label}/{name}"))
        res = query_image(str(path), reader, k=5, model=model)  # the centre patch of the deepest layer
        found = [int(i) for i in res.hits["image"]]
        assert original in found, (name, found, [sources[i] for i in found])
        assert float(res.hits["score"][0]) < 0.999  # a new picture, not a stored one
