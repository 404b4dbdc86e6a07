"""The case-study kernels (hoverlay.stores.case_metrics) on synthetic maps with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import modules_after

from hoverlay.stores.case_metrics import (
    autocorrelation,
    border_cells,
    cell_at,
    cell_means,
    image_lag,
    increasing,
    interior_cells,
    map_correlation,
    map_difference,
    neighbour_agreement,
    on_canvas_always,
    percentile_of,
    rounded,
    shuffled_agreement,
    sign_test,
    total_variation,
)
from hoverlay.stores.transforms import map_patch, sweep_similarity

ANGLES = [float(a) for a in range(30, 360, 30)]


def ramp(h: int = 14, w: int = 14) -> np.ndarray:
    return np.add.outer(np.arange(h), np.arange(w)).astype(float)


def checkerboard(h: int = 14, w: int = 14) -> np.ndarray:
    return np.where(np.add.outer(np.arange(h), np.arange(w)) % 2 == 0, 1.0, -1.0)


def blurred_noise(rng: np.random.Generator, side: int, width: int) -> np.ndarray:
    """White noise smoothed by a box of ``width`` cells (wrapping): smoother as width grows."""
    m = rng.normal(size=(side, side))
    out = np.zeros_like(m)
    for dy in range(width):
        for dx in range(width):
            out += np.roll(np.roll(m, dy, 0), dx, 1)
    return out / width ** 2


# -------------------------------------------------------------------------------- smoothness
def test_autocorrelation_of_known_maps():
    assert autocorrelation(ramp()) == pytest.approx(1.0, abs=0.02)  # each step shifts the ramp by one
    assert autocorrelation(checkerboard()) == pytest.approx(-1.0)
    assert autocorrelation(checkerboard(), lag=2) == pytest.approx(1.0)
    noise = np.random.default_rng(0).normal(size=(200, 14, 14))
    assert abs(float(autocorrelation(noise).mean())) < 0.03
    assert math.isnan(float(autocorrelation(np.full((7, 7), 0.3))))


def test_smoother_maps_score_smoother_by_both_metrics():
    rng = np.random.default_rng(1)
    maps = {w: np.stack([blurred_noise(rng, 28, w) for _ in range(30)]) for w in (1, 3, 6)}
    ac = [float(autocorrelation(maps[w]).mean()) for w in (1, 3, 6)]
    tv = [float(total_variation(maps[w]).mean()) for w in (1, 3, 6)]
    assert increasing(ac) and increasing([-v for v in tv]), (ac, tv)
    # a stack is measured map by map, as one map at a time
    np.testing.assert_allclose(autocorrelation(maps[3]), [autocorrelation(m) for m in maps[3]])


def test_total_variation_is_scale_free_with_known_values():
    assert total_variation(checkerboard()) == pytest.approx(2.0)
    noise = np.random.default_rng(2).normal(size=(100, 28, 28))
    assert float(total_variation(noise).mean()) == pytest.approx(2 / math.sqrt(math.pi), rel=0.03)
    m = np.random.default_rng(3).random((14, 14))
    assert total_variation(5 * m + 2) == pytest.approx(float(total_variation(m)))
    assert autocorrelation(5 * m + 2) == pytest.approx(float(autocorrelation(m)))
    assert total_variation(ramp()) == pytest.approx(1 / ramp().std())  # every step is 1: a smooth map, 0.18
    assert total_variation(ramp(), lag=3) == pytest.approx(3 / ramp().std())
    assert math.isnan(float(total_variation(np.zeros((4, 4)))))


def test_the_same_image_distance_at_every_resolution():
    assert [image_lag(h, 7) for h in (28, 14, 7)] == [4, 2, 1]
    # one smooth image seen at three resolutions: the same lag in image units gives similar values
    fine = blurred_noise(np.random.default_rng(4), 28, 8)
    coarse = fine.reshape(7, 4, 7, 4).mean(axis=(1, 3))
    assert autocorrelation(fine, image_lag(28, 7)) == pytest.approx(float(autocorrelation(coarse, 1)), abs=0.15)
    with pytest.raises(ValueError):
        image_lag(7, 14)
    with pytest.raises(ValueError):
        autocorrelation(np.zeros((3, 3)), lag=3)
    with pytest.raises(ValueError):
        autocorrelation(np.zeros((3, 3)), lag=0)


def test_map_difference():
    m = np.random.default_rng(5).random((14, 14))
    assert map_difference(m, 3 * m + 1) == pytest.approx(0.0, abs=1e-12)
    assert map_difference(m, -m) == pytest.approx(2.0)
    other = np.random.default_rng(6).random((14, 14))
    assert 0.7 < map_difference(m, other) < 1.3
    assert map_correlation(m, other) == pytest.approx(float(np.corrcoef(m.ravel(), other.ravel())[0, 1]))
    assert math.isnan(map_correlation(m, np.ones((14, 14))))
    with pytest.raises(ValueError):
        map_difference(m, m[:7])


def test_percentile_of():
    m = np.arange(100.0).reshape(10, 10)
    assert percentile_of(m, 95) == 95.0 and percentile_of(m, 1000) == 100.0 and percentile_of(m, -1) == 0.0


# ------------------------------------------------------------------------------------- cells
def test_cell_at():
    assert cell_at(0.38, 0.32, 14, 14) == (5, 4)
    assert cell_at(0.38, 0.32, 28, 28) == (10, 8)
    assert cell_at(1.0, 1.0, 7, 7) == (6, 6) and cell_at(0.0, 0.0, 7, 7) == (0, 0)
    with pytest.raises(ValueError):
        cell_at(1.2, 0.5, 7, 7)


@pytest.mark.parametrize("side", [7, 14, 28])
def test_border_and_interior_cells_stay_on_the_canvas_at_every_angle(side):
    kinds = ["rotate"] * len(ANGLES)
    border = border_cells(side, side, kinds, ANGLES)
    inner = interior_cells(side, side, kinds, ANGLES)
    assert border and inner and not set(border) & set(inner)
    # every selected cell has a counterpart in every rotated copy: sweep_similarity is never NaN
    rng = np.random.default_rng(side)
    vecs = rng.normal(size=(len(ANGLES) + 1, side, side, 4)).astype(np.float32)
    for y, x in border + inner:
        assert np.isfinite(sweep_similarity(vecs[0], list(vecs[1:]), kinds, ANGLES, y, x)).all()
    assert all(min(y, x, side - 1 - y, side - 1 - x) == 0 for y, x in border)  # the outer ring
    assert all(min(y, x, side - 1 - y, side - 1 - x) >= side // 4 for y, x in inner)
    corners = {(0, 0), (0, side - 1), (side - 1, 0), (side - 1, side - 1)}
    assert not corners & set(border)  # they rotate off the canvas
    mid = side // 2
    assert {(0, mid), (mid, 0), (side - 1, mid), (mid, side - 1)} <= set(border)  # the middles of the sides stay
    # the selection is exactly the ring cells that never leave: checked against map_patch directly
    ring = [(y, x) for y in range(side) for x in range(side) if min(y, x, side - 1 - y, side - 1 - x) == 0]
    assert border == [c for c in ring if all(map_patch(*c, side, side, "rotate", a) is not None for a in ANGLES)]
    assert len(border) < len(ring)


def test_on_canvas_always_for_right_angles_and_for_zoom():
    every = on_canvas_always(8, 8, ["rotate"] * 3, [90, 180, 270])
    assert every.all()  # right angles keep every cell of a square map
    zoom = on_canvas_always(8, 8, ["scale"], [0.5])
    assert zoom[2:6, 2:6].all() and not zoom[0].any() and not zoom[:, 7].any()  # zoom x2 keeps the centre half
    assert border_cells(8, 8, ["scale"], [0.5]) == []
    assert interior_cells(8, 8, ["scale"], [0.5]) == [(y, x) for y in range(2, 6) for x in range(2, 6)]
    assert border_cells(8, 8, [], []) == [(y, x) for y in range(8) for x in range(8)
                                           if min(y, x, 7 - y, 7 - x) == 0]  # no sweep: the whole ring
    with pytest.raises(ValueError):
        on_canvas_always(8, 8, ["rotate"], [])
    with pytest.raises(ValueError):
        border_cells(8, 8, [], [], ring=0)


def test_cell_means():
    px = np.zeros((8, 8, 3), np.uint8)
    px[:4, :4] = (255, 0, 0)
    px[4:, 4:] = (0, 0, 200)
    means = cell_means(px, 2, 2)
    assert means[0, 0].tolist() == [255, 0, 0] and means[1, 1].tolist() == [0, 0, 200]
    assert means[0, 1].tolist() == [0, 0, 0]
    odd = cell_means(np.arange(7 * 7 * 1, dtype=float).reshape(7, 7, 1), 7, 7)
    assert odd[..., 0].tolist() == np.arange(49.0).reshape(7, 7).tolist()


# ------------------------------------------------------------------------------------ groups
def test_neighbour_agreement_and_its_shuffled_chance_level():
    halves = np.zeros((1, 8, 8), int)
    halves[0, :, 4:] = 1
    assert neighbour_agreement(halves) == pytest.approx(1 - 8 / 112)  # only the 8 pairs across the cut differ
    assert neighbour_agreement(np.zeros((2, 3, 3), int)) == 1.0
    assert neighbour_agreement((checkerboard(6, 6) > 0).astype(int)) == 0.0
    no_group = np.full((3, 3), -1)
    assert math.isnan(neighbour_agreement(no_group))
    partial = np.array([[0, 0, -1], [0, 1, -1]])
    assert neighbour_agreement(partial) == pytest.approx(2 / 4)  # pairs with -1 are left out
    chance = shuffled_agreement(np.repeat(halves, 5, axis=0), n=10, seed=0)
    assert chance.shape == (10,) and 0.35 < chance.mean() < 0.6 and chance.max() < neighbour_agreement(halves)
    np.testing.assert_array_equal(chance, shuffled_agreement(np.repeat(halves, 5, axis=0), n=10, seed=0))


# --------------------------------------------------------------------------------- verdicts
def test_sign_test_and_increasing():
    assert sign_test(10, 10) == pytest.approx(1 / 1024)
    assert sign_test(0, 10) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(5, 10) == pytest.approx(sum(math.comb(10, k) for k in range(5, 11)) / 1024)
    with pytest.raises(ValueError):
        sign_test(11, 10)
    assert increasing([0.1, 0.2, 0.7]) and not increasing([0.1, 0.1, 0.7]) and not increasing([0.2, float("nan")])
    assert not increasing([1.0])


def test_rounded_for_reading():
    keys = np.float32([0.5, 0.6, 0.7])
    assert str(float(keys[1])) == "0.6000000238418579"
    assert rounded(dict(zip(keys.tolist(), np.float32([0.81234, 0.9, 1.0]).tolist(), strict=True))) == {0.5: 0.812, 0.6: 0.9, 0.7: 1.0}
    assert rounded({"a": [np.float64(0.123456), np.int64(3), True]}, 2) == {"a": [0.12, 3, True]}
    assert rounded(np.array([1.23456])) == [1.235] and rounded((0.5, "x")) == (0.5, "x")
    assert str(rounded(-0.0001)) == "0.0" and math.isnan(rounded(float("nan")))


def test_case_metrics_import_no_torch():
    mods = modules_after("import hoverlay.stores.case_metrics")
    assert "torch" not in mods and "panel" not in mods and "hoverlay.pipeline" not in mods
