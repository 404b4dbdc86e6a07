"""A damaged store in the explorer: damaged images are grey "unreadable" tiles, the rest works."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hoverlay.explorer.damage import UNREADABLE_GREY, TolerantReader
from hoverlay.stores import CorruptStoreError, LayerGeometry, open_store
from hoverlay.stores.synthetic import make_synthetic_store

LAYERS = {"fine": LayerGeometry(4, 4, 8), "coarse": LayerGeometry(2, 2, 8)}


@pytest.fixture
def damaged(tmp_path):
    url = str(tmp_path / "s")
    make_synthetic_store(url, 12, layers=LAYERS, image_size=16, chunk=4)
    os.remove(os.path.join(url, "layers", "fine", "vectors", "c", "1", "0", "0", "0"))  # images 4..7
    return url


def test_tolerant_reads_fill_only_the_damaged_images(damaged):
    reader = open_store(damaged)
    with pytest.raises(CorruptStoreError):
        reader.vectors("fine", np.arange(12))
    tolerant = TolerantReader(reader)
    v = tolerant.vectors("fine", np.arange(2, 10))
    assert tolerant.damaged == {4, 5, 6, 7}
    np.testing.assert_array_equal(v[:2], reader.vectors("fine", [2, 3]))
    assert not v[2:6].any() and v[6:].any()
    assert tolerant.pixels(np.arange(12)).shape == (12, 16, 16, 3)  # pixels are intact
    assert tolerant.n_images == 12  # everything else passes through


def test_a_page_with_damaged_images_shows_them_unreadable_and_hovering_works(damaged):
    from hoverlay.explorer.app import create_app

    app = create_app(damaged, page_size=12, ncols=4, browser_hover_budget=0).app
    app.grid._on_pointer("data", None, {"tile": [1], "y": [1], "x": [1], "click": [0]})  # reads "fine"
    captions = app.grid.shared.labels.data["text"]
    assert [captions[i] for i in (4, 5, 6, 7)] == [f"#{i} unreadable" for i in (4, 5, 6, 7)]
    assert captions[3].startswith("#3 ") and "unreadable" not in captions[3]
    fine = next(f for f in app.grid.figures if f.layer == "fine")
    maps = fine.source.data["image"][0]
    assert np.isfinite(maps).any()  # the good tiles have their overlays
    # the exact scan meets the damage: one line without server paths (the log has them)
    assert "top-k search failed: some images of this store are damaged" in app.state.message
    assert damaged not in app.state.message and "/" not in app.state.message.split("damaged")[-1]


def test_unreadable_pixels_are_grey(tmp_path):
    url = str(tmp_path / "s")
    make_synthetic_store(url, 8, layers=LAYERS, image_size=16, chunk=4)
    with open(os.path.join(url, "images", "pixels", "c", "0", "0", "0", "0"), "r+b") as f:
        f.truncate(12)
    tolerant = TolerantReader(open_store(url))
    pixels = tolerant.pixels(np.arange(8))
    assert tolerant.damaged == {0, 1, 2, 3}
    assert (pixels[:4] == UNREADABLE_GREY).all() and not (pixels[4:] == UNREADABLE_GREY).all()
