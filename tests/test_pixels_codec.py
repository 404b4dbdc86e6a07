"""Pixels with an image codec (format 3): round trips, the lossless options, the quality option
checked before any write, older stores that still open, damage that is an error, draft decoding.

Tiny stores (24 px images) and a two-conv model keep each test to about a second.
"""

import io
import json
import os

import numpy as np
import pytest
import zarr
from conftest import write_generated_images
from PIL import Image

from hoverlay.cli import main
from hoverlay.errors import EXIT_INPUT, EXIT_USAGE
from hoverlay.options import OptionError
from hoverlay.pipeline.build import build
from hoverlay.pipeline.errors import BuildUsageError
from hoverlay.stores import CorruptStoreError, LayerGeometry, create_store, open_store
from hoverlay.stores.errors import StoreMismatchError
from hoverlay.stores.format import FORMAT_VERSION, PIXELS
from hoverlay.stores.pixels import LEGACY_PIXEL_CODEC, PIXEL_CODECS, PixelCodec

SIZE = 24
TINY = {"model": "python:test_build:tiny_model", "layers": ["1", "3"], "size": 32, "chunk": 4}
ROWS = {"label": "", "base_id": -1, "transform": "none", "param": 0.0, "status": "ok", "reason": ""}


def smooth_images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Photo-like content (gradients, a disc, mild noise): what lossy codecs are made for."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b = rng.uniform(0.5, 3, 2)
        img = 128 + 80 * np.stack([np.sin(a * xx + b * yy + k) for k in range(3)], -1)
        img[(xx - rng.uniform(.3, .7)) ** 2 + (yy - .5) ** 2 < .05] = rng.uniform(0, 255, 3)
        out.append(np.clip(img + rng.normal(0, 2, img.shape), 0, 255))
    return np.stack(out).astype(np.uint8)


def write_store(path, pixels: np.ndarray, codec: PixelCodec | None, chunk: int = 4):
    rng = np.random.default_rng(1)
    n = len(pixels)
    w = create_store(str(path), model={"spec": "t"}, preprocessing={}, image_size=pixels.shape[1],
                     layers={"l": LayerGeometry(2, 2, 4)}, chunk=chunk, pixels=codec)
    start = w.reserve(n)
    w.write_block(start, pixels, {"l": rng.random((n, 2, 2, 4), dtype=np.float32) + 0.1})
    w.write_table(start, [{"source": f"s{i}", "hash": f"h{i}", **ROWS} for i in range(n)])
    w.commit(n)
    return str(path)


@pytest.mark.parametrize("codec,quality,max_mean_error", [
    # measured on these images: 2.9-4.3, 4.3-7.1, 3.1-4.3, 2.0-2.6 levels (noise alone: 1.6)
    ("jpeg", 90, 5.5), ("jpeg", 50, 9.0), ("webp", 85, 5.5), ("avif", 60, 4.0)])
def test_lossy_pixels_round_trip_within_the_codecs_tolerance(tmp_path, codec, quality, max_mean_error):
    pixels = smooth_images(6, size=64)
    url = write_store(tmp_path / "s", pixels, PixelCodec(codec, quality))
    reader = open_store(url)
    assert reader.attrs.format_version == FORMAT_VERSION == 3
    assert reader.attrs.pixels == PixelCodec(codec, quality)
    back = reader.pixels(slice(None))
    assert back.shape == pixels.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - pixels).reshape(6, -1).mean(axis=1)
    assert err.max() <= max_mean_error, err
    assert not np.array_equal(back, pixels)  # lossy for real
    np.testing.assert_array_equal(reader.pixels([4, 1]), back[[4, 1]])  # one chunk per image
    # the chunks are images of the named codec, each followed by its CRC32C
    codecs = zarr.open_array(f"{url}/{PIXELS}", mode="r").metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    assert codecs[0]["name"] == f"imagecodecs_{codec}" and codecs[1] == {"name": "crc32c"}


@pytest.mark.parametrize("codec", ["jpeg", "webp", "avif", "zstd"])
def test_lossless_pixels_round_trip_exactly(tmp_path, codec):
    rng = np.random.default_rng(3)
    pixels = np.concatenate([smooth_images(3), rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)])
    url = write_store(tmp_path / "s", pixels, PixelCodec(codec, "lossless"))
    np.testing.assert_array_equal(open_store(url).pixels(slice(None)), pixels)


def test_pixel_codec_values_are_checked():
    from hoverlay.pipeline.options import PIXEL_CODECS as OPTION_CODECS

    assert OPTION_CODECS == PIXEL_CODECS
    for codec, quality in [("png", 90), ("jpeg", 0), ("jpeg", 101), ("jpeg", "best"), ("zstd", 80), ("jpeg", True)]:
        with pytest.raises(ValueError):
            PixelCodec(codec, quality)
    assert PixelCodec.from_json(PixelCodec("webp", "lossless").to_json()) == PixelCodec("webp", "lossless")


@pytest.mark.parametrize("options,error,says", [
    ({"pixel_quality": 0}, OptionError, "pixel_quality"),
    ({"pixel_quality": "best"}, OptionError, "pixel_quality"),
    ({"pixel_codec": "png"}, OptionError, "pixel_codec"),
    ({"pixel_codec": "zstd", "pixel_quality": 80}, BuildUsageError, "zstd is lossless"),
])
def test_the_quality_option_is_checked_before_any_write(tmp_path, options, error, says):
    src = str(tmp_path / "images")
    write_generated_images(src, 2)
    store = tmp_path / "s"
    with pytest.raises(error, match=says):
        build(src, str(store), quiet=True, index=False, **TINY, **options)
    assert not store.exists()


def test_the_cli_flag_and_the_config_key(tmp_path, capsys):
    src = str(tmp_path / "images")
    write_generated_images(src, 3)
    base = ["build", "--images", src, "-q", "--no-index", "--model", TINY["model"], "--layers", "1,3",
            "--size", "32", "--chunk", "4"]
    assert main([*base, "--store", str(tmp_path / "bad"), "--pixel-quality", "101"]) == EXIT_USAGE
    assert "pixel-quality" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*base, "--store", str(tmp_path / "a"), "--pixel-codec", "webp", "--pixel-quality", "lossless"]) == 0
    assert open_store(tmp_path / "a").attrs.pixels == PixelCodec("webp", "lossless")
    config = tmp_path / "build.toml"
    config.write_text('pixel_codec = "jpeg"\npixel_quality = 70\n')
    assert main([*base, "--store", str(tmp_path / "b"), "--config", str(config)]) == 0
    assert open_store(tmp_path / "b").attrs.pixels == PixelCodec("jpeg", 70)


def test_a_build_stores_jpeg_90_pixels_and_an_existing_store_keeps_its_own(tmp_path):
    src = str(tmp_path / "images")
    write_generated_images(src, 5)
    url = str(tmp_path / "s")
    build(src, url, quiet=True, index=False, **TINY)
    reader = open_store(url)
    assert reader.attrs.pixels == PixelCodec("jpeg", 90) and reader.attrs.format_version == 3
    assert reader.attrs.preprocessing["jpeg_draft"] == 2
    write_generated_images(src, 3, seed=1)
    s = build(src, url, quiet=True, index=False)  # appending: no codec flag needed
    assert (s.added, s.skipped) == (3, 5)
    with pytest.raises(StoreMismatchError, match="keeps its pixels as jpeg 90"):
        build(src, url, quiet=True, index=False, pixel_quality=80)
    assert set(s.phases) >= {"read", "decode", "resize", "forward", "normalize", "write_pixels",
                             "write_vectors", "table"}


def as_format_2(url: str) -> None:
    """Rewrite a store's root document as the previous version wrote it (no ``pixels`` key)."""
    path = os.path.join(url, "zarr.json")
    doc = json.loads(open(path).read())
    attrs = doc["attributes"]["hoverlay"]
    attrs["format_version"] = 2
    del attrs["pixels"]
    open(path, "w").write(json.dumps(doc))


def test_a_format_2_store_with_zstd_pixels_still_opens_reads_and_grows(tmp_path):
    """The previous version's layout: zstd uint8 pixels, no codec in the attributes."""
    pixels = smooth_images(5)
    url = write_store(tmp_path / "old", pixels, None)  # create_store's default is format 2's codec
    as_format_2(url)
    reader = open_store(url)
    assert reader.attrs.format_version == 2 and reader.attrs.pixels == LEGACY_PIXEL_CODEC
    np.testing.assert_array_equal(reader.pixels(slice(None)), pixels)
    assert "pixels" not in reader.attrs.to_json()  # a format-2 store is rewritten as format 2

    # a build appends to it (same decode as before: no draft key) and it stays version 2
    src = str(tmp_path / "images")
    write_generated_images(src, 4)
    built = str(tmp_path / "built")
    build(src, built, quiet=True, index=False, pixel_codec="zstd", **TINY)
    doc = json.loads(open(os.path.join(built, "zarr.json")).read())
    doc["attributes"]["hoverlay"]["preprocessing"].pop("jpeg_draft")
    open(os.path.join(built, "zarr.json"), "w").write(json.dumps(doc))
    as_format_2(built)
    before = open_store(built).pixels(slice(None))
    write_generated_images(src, 2, seed=1)
    assert main(["build", "--images", src, "--store", built, "-q", "--no-index"]) == 0
    reader = open_store(built)
    assert reader.n_images == 6 and reader.attrs.format_version == 2
    assert "jpeg_draft" not in reader.attrs.preprocessing
    np.testing.assert_array_equal(reader.pixels(slice(0, 4)), before)
    assert main(["build", "--images", src, "--store", built, "-q", "--no-index",
                 "--pixel-codec", "jpeg"]) == EXIT_INPUT  # its pixels stay zstd


def test_a_corrupt_pixel_chunk_is_an_error_not_garbage(tmp_path, capsys):
    """A JPEG decoder turns damaged entropy data into plausible garbage without a word; the
    CRC32C after each image makes it a CorruptStoreError naming the images and the file."""
    url = write_store(tmp_path / "s", smooth_images(8), PixelCodec("jpeg", 90))
    shard = os.path.join(url, "images", "pixels", "c", "1", "0", "0", "0")  # images 4..7
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 4: len(data) // 4 + 8] = b"\x00" * 8  # inside image 4 or 5, not the index
    open(shard, "wb").write(bytes(data))
    reader = open_store(url)
    assert reader.pixels([0, 3]).shape == (2, SIZE, SIZE, 3)  # the other shard reads fine
    with pytest.raises(CorruptStoreError, match=r"images/pixels of image\(s\) 4") as err:
        reader.pixels(slice(4, 8))
    assert shard in str(err.value) and "does not decode" in str(err.value)
    assert main(["check", url]) != 0
    assert "images/pixels" in capsys.readouterr().out + capsys.readouterr().err


def test_large_jpegs_decode_in_draft_mode_close_to_a_full_decode():
    from hoverlay.pipeline.preprocess import decode_image, draft_size, load_pixels

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:1200] / 300
    img = np.clip(128 + 60 * np.stack([np.sin(xx * (k + 1) + yy) for k in range(3)], -1)
                  + rng.normal(0, 3, (900, 1200, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=92)
    data = buf.getvalue()
    to = draft_size(64, {"jpeg_draft": 2})
    assert to == 128 and draft_size(64, {}) is None
    assert decode_image(data, draft_to=to).size == (300, 225)  # 1/4 scale: both sides >= 128
    assert decode_image(data).size == (1200, 900)
    full, draft = load_pixels(data, 64), load_pixels(data, 64, draft_to=to)
    assert np.abs(full.astype(int) - draft).mean() < 1.0
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")
    assert decode_image(png.getvalue(), draft_to=to).size == (1200, 900)  # only JPEGs have a draft mode


def test_unit_vectors_in_torch_match_the_stores_normalisation():
    import torch

    from hoverlay.pipeline.tasks import unit_vectors
    from hoverlay.stores import normalize_patches

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 5, 7)).astype(np.float32)
    x[1, :, 2, 3] = 0  # a zero vector stays zero
    unit, norms = unit_vectors(torch.from_numpy(x))
    ref_unit, ref_norms = normalize_patches(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    assert unit.dtype == np.float16 and unit.shape == (3, 5, 7, 16) and norms.shape == (3, 5, 7)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6)
    assert np.abs(unit.astype(np.float32) - ref_unit.astype(np.float32)).max() <= 1e-3  # <= 1 fp16 ulp
    assert not unit[1, 2, 3].any() and norms[1, 2, 3] == 0
