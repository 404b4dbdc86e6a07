"""Geometric sweeps: coordinate maps, the copies the pipeline stores, and sweep similarities."""

import numpy as np
import pytest

from hoverlay.pipeline.build import build
from hoverlay.pipeline.transforms import apply_transform, parse_sweep
from hoverlay.stores import open_store
from hoverlay.stores.transforms import copies_of, map_patch, sweep_similarity


def test_parse_sweep_excludes_the_identity():
    assert parse_sweep("0:360:90", 0.0) == [90.0, 180.0, 270.0]
    assert parse_sweep("0.5:1.0:0.1", 1.0) == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_sweep(None, 0.0) == []
    with pytest.raises(ValueError, match="start:stop:step"):
        parse_sweep("0:10", 0.0)


def test_rotation_by_90_maps_corners_to_corners():
    h = w = 7
    # counter-clockwise: top-left -> bottom-left -> bottom-right -> top-right -> top-left
    assert map_patch(0, 0, h, w, "rotate", 90) == (h - 1, 0)
    assert map_patch(h - 1, 0, h, w, "rotate", 90) == (h - 1, w - 1)
    assert map_patch(h - 1, w - 1, h, w, "rotate", 90) == (0, w - 1)
    assert map_patch(0, w - 1, h, w, "rotate", 90) == (0, 0)
    assert map_patch(3, 3, h, w, "rotate", 90) == (3, 3)  # the centre stays
    assert map_patch(0, 0, h, w, "rotate", 45) is None  # a corner leaves the canvas


def test_scale_one_and_rotate_zero_are_identities():
    for y in range(5):
        for x in range(6):
            assert map_patch(y, x, 5, 6, "scale", 1.0) == (y, x)
            assert map_patch(y, x, 5, 6, "rotate", 0) == (y, x)
            assert map_patch(y, x, 5, 6, "none", 0) == (y, x)
    # zooming in by 2 pushes the outer ring off the canvas and keeps the centre
    assert map_patch(0, 0, 8, 8, "scale", 0.5) is None
    assert map_patch(3, 3, 8, 8, "scale", 0.5) == (3, 3)
    assert map_patch(2, 5, 8, 8, "scale", 0.5) == (1, 7)


@pytest.mark.parametrize("kind, param", [("rotate", 90), ("rotate", 30), ("scale", 0.6), ("scale", 0.8)])
def test_pixel_transforms_agree_with_the_coordinate_map(kind, param):
    """A bright cell in the base image ends up in the cell map_patch predicts."""
    s, cells = 224, 14
    step = s // cells
    for y, x in [(5, 6), (7, 7), (4, 9)]:
        img = np.zeros((s, s, 3), np.uint8)
        img[y * step + 4:(y + 1) * step - 4, x * step + 4:(x + 1) * step - 4] = 255
        out = apply_transform(img, kind, param).astype(float).mean(axis=2)
        pooled = out.reshape(cells, step, cells, step).mean(axis=(1, 3))
        assert np.unravel_index(pooled.argmax(), pooled.shape) == map_patch(y, x, cells, cells, kind, param)


def test_sweep_store_rows_and_line_chart_data(tmp_path, generated_images):
    src = generated_images(2)
    store = str(tmp_path / "sweep")
    build(src, store, rotate="0:360:90", scale="0.5:1.0:0.25", quiet=True, index=False,
          model="torchvision:googlenet", weights="none", layers=["inception4d"],
          pixel_codec="zstd")  # lossless: copies are compared with transforms of the stored base
    r = open_store(store)
    t = r.table()
    assert r.n_images == 2 * (1 + 3 + 2)
    assert list(t["transform"][:6]) == ["none", "rotate", "rotate", "rotate", "scale", "scale"]
    np.testing.assert_allclose(t["param"][:6], [0, 90, 180, 270, 0.5, 0.75])
    assert list(t["base_id"]) == [-1] + [0] * 5 + [-1] + [6] * 5
    assert all(h.startswith(t["hash"][0]) for h in t["hash"][1:6])
    # copies are transforms of the stored base pixels
    base = r.pixels(0)
    np.testing.assert_array_equal(r.pixels(1), apply_transform(base, "rotate", 90))
    # line-chart data equals similarities computed directly from the stored vectors
    ids = copies_of(t["base_id"], 0)
    layer = "inception4d"
    vb = r.vectors(layer, 0)
    copies = [r.vectors(layer, int(i)) for i in ids]
    chart = sweep_similarity(vb, copies, t["transform"][ids], t["param"][ids], 7, 3)
    for value, i in zip(chart, ids, strict=True):
        hit = map_patch(7, 3, 14, 14, t["transform"][i], float(t["param"][i]))
        if hit is None:
            assert np.isnan(value)
        else:
            direct = float(r.vectors(layer, int(i))[hit].astype(np.float64) @ vb[7, 3].astype(np.float64))
            assert value == pytest.approx(direct, abs=1e-3)
    assert not np.isnan(chart).any()  # (7, 3) stays on the canvas in every copy
    corner = sweep_similarity(vb, copies, t["transform"][ids], t["param"][ids], 1, 1)
    assert np.isnan(corner[3]) and not np.isnan(corner[:3]).any()  # zoom x2 pushes it off
