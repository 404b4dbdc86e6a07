"""Unit tests of explorer.kernels (and the pure paging/engine helpers built on them)."""

from __future__ import annotations

import numpy as np
import pytest

from hoverlay.explorer.kernels import (
    QueryVector,
    cell_bounds,
    color_range,
    crop_box,
    images_by_best_patch,
    map_patch,
    page_block,
    page_similarity,
    pointer_to_patch,
    similarity_map,
)
from hoverlay.stores.vectors import normalize_patches


def _page(rng: np.random.Generator, n: int, h: int, w: int, d: int, signed: bool = False):
    acts = rng.standard_normal((n, h, w, d)).astype(np.float32)
    if not signed:
        acts = np.maximum(acts, 0)
    unit, norms = normalize_patches(acts)  # what the store holds: fp16 unit vectors + fp32 norms
    return unit, norms


def _reference(unit, norms, q_unit, q_norm, function, sigma=1.0):
    """float64 reference on the stored (fp16-rounded) values."""
    v = unit.astype(np.float64)
    q = q_unit.astype(np.float64)
    cos = np.einsum("nhwd,d->nhw", v, q)
    if function == "cosine":
        return cos
    a = v * norms.astype(np.float64)[..., None]
    b = q * q_norm
    if function == "dot":
        return np.einsum("nhwd,d->nhw", a, b)
    # ‖a-b‖² from the stored norms (exact for the original activations) and the stored directions
    na, nb = norms.astype(np.float64), float(q_norm)
    d2 = np.maximum(na**2 + nb**2 - 2 * na * nb * cos, 0)
    return np.exp(-d2 / (2 * sigma**2))


@pytest.mark.parametrize("function", ["cosine", "dot", "rbf"])
@pytest.mark.parametrize("signed", [False, True])
def test_page_similarity_equals_float64_reference(function, signed):
    rng = np.random.default_rng(1)
    layers = {"a": (16, 28, 28, 40), "b": (16, 7, 7, 320)}
    pages = {name: _page(rng, *shape, signed=signed) for name, shape in layers.items()}
    blocks = {name: page_block(u, n) for name, (u, n) in pages.items()}
    queries, sigmas = {}, {}
    for name, (unit, norms) in pages.items():
        queries[name] = QueryVector(unit[3, 5, 6].astype(np.float32), float(norms[3, 5, 6]))
        sigmas[name] = float(np.median(norms))
    maps = page_similarity(queries, blocks, function, sigmas)
    for name, (unit, norms) in pages.items():
        ref = _reference(unit, norms, queries[name].unit, queries[name].norm, function, sigmas[name])
        got = maps[name]
        assert got.dtype == np.float32 and got.shape == ref.shape
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * scale)
    # the query patch is most similar to itself
    if function in ("cosine", "rbf"):
        assert maps["a"][3, 5, 6] == pytest.approx(1.0, abs=1e-3)


def test_rbf_and_dot_match_the_original_activations():
    """dot and RBF are defined on the unnormalised activations the store was written from."""
    rng = np.random.default_rng(2)
    acts = np.maximum(rng.standard_normal((4, 5, 5, 24)), 0).astype(np.float32) * 3
    unit, norms = normalize_patches(acts)
    q = acts[1, 2, 3].astype(np.float64)
    qv = QueryVector(unit[1, 2, 3].astype(np.float32), float(norms[1, 2, 3]))
    block = page_block(unit, norms)
    a = acts.astype(np.float64)
    np.testing.assert_allclose(similarity_map(qv, block, "dot"), a @ q, rtol=2e-3, atol=1e-2)
    sigma = 4.0
    ref = np.exp(-((a - q) ** 2).sum(-1) / (2 * sigma**2))
    np.testing.assert_allclose(similarity_map(qv, block, "rbf", sigma), ref, atol=2e-3)


def test_similarity_map_rejects_wrong_dimension_and_function():
    unit, norms = _page(np.random.default_rng(0), 2, 3, 3, 8)
    block = page_block(unit, norms)
    with pytest.raises(ValueError, match="dimension"):
        similarity_map(QueryVector(np.ones(7, np.float32), 1.0), block)
    with pytest.raises(ValueError, match="'manhattan'"):
        similarity_map(QueryVector(np.ones(8, np.float32), 1.0), block, "manhattan")


def test_zero_vectors_give_zero_cosine_not_nan():
    unit, norms = normalize_patches(np.zeros((1, 2, 2, 4), np.float32))
    out = similarity_map(QueryVector(np.ones(4, np.float32) / 2, 1.0), page_block(unit, norms))
    assert np.all(out == 0)


def test_color_ranges_are_fixed_per_function():
    assert color_range("cosine", nonnegative=True) == (0.0, 1.0)
    assert color_range("cosine", nonnegative=False) == (-1.0, 1.0)
    assert color_range("rbf") == (0.0, 1.0)
    assert color_range("dot", nonnegative=True, norm_hi=3.0) == (0.0, 9.0)
    assert color_range("dot", nonnegative=False, norm_hi=2.0) == (-4.0, 4.0)
    with pytest.raises(ValueError):
        color_range("nope")


@pytest.mark.parametrize(("src", "dst", "cell", "expected"), [
    ((28, 28), (7, 7), (0, 0), (0, 0)),        # top-left corner
    ((28, 28), (7, 7), (27, 27), (6, 6)),      # bottom-right corner
    ((28, 28), (7, 7), (0, 27), (0, 6)),       # top-right corner
    ((28, 28), (7, 7), (27, 0), (6, 0)),       # bottom-left corner
    ((28, 28), (7, 7), (14, 14), (3, 3)),      # centre: cell 14 centre 14.5/28 -> 3.625/7
    ((28, 28), (7, 7), (13, 13), (3, 3)),      # 13.5/28*7 = 3.375
    ((28, 28), (7, 7), (11, 12), (2, 3)),      # 11.5*7/28 = 2.875 ; 12.5*7/28 = 3.125
    ((7, 7), (28, 28), (0, 0), (2, 2)),        # coarse -> fine: centre 0.5/7 of the image -> 2/28
    ((7, 7), (28, 28), (6, 6), (26, 26)),
    ((7, 7), (28, 28), (3, 3), (14, 14)),      # exact centre of the image
    ((7, 7), (14, 14), (0, 6), (1, 13)),       # centre on a cell boundary belongs to the next cell
    ((14, 14), (14, 14), (5, 9), (5, 9)),      # same resolution: identity
    ((8, 4), (2, 8), (7, 3), (1, 7)),          # non-square maps
])
def test_map_patch_via_cell_centres(src, dst, cell, expected):
    y, x = map_patch(*cell, src, dst)
    assert (int(y), int(x)) == expected
    # the same as "cell of the other layer containing the cell centre in image coordinates"
    s = 224.0
    cy, cx = (cell[0] + 0.5) * s / src[0], (cell[1] + 0.5) * s / src[1]
    assert (int(cy * dst[0] // s), int(cx * dst[1] // s)) == expected


def test_map_patch_is_vectorised():
    ys, xs = map_patch(np.arange(28), np.arange(28)[::-1], (28, 28), (7, 7))
    np.testing.assert_array_equal(ys, np.arange(28) // 4)
    np.testing.assert_array_equal(xs, np.arange(28)[::-1] // 4)


@pytest.mark.parametrize(("px", "py", "expected"), [
    (0, 0, (0, 0)),                 # top-left pixel corner
    (223.999, 0, (0, 27)),          # just inside the right edge
    (224, 224, (27, 27)),           # exactly on the bottom-right edge: still the last cell
    (224, 0, (0, 27)),
    (0, 224, (27, 0)),
    (7.999, 8.0, (1, 0)),           # cell boundary at 8 px belongs to the next cell
    (112, 112, (14, 14)),
    (-0.01, 5, None),               # outside the image
    (5, 224.01, None),
])
def test_pointer_to_patch_at_edges(px, py, expected):
    assert pointer_to_patch(px, py, (28, 28), 224) == expected


def test_pointer_to_patch_non_square_grid():
    assert pointer_to_patch(63.9, 0.0, (4, 8), 64) == (0, 7)
    assert pointer_to_patch(0.0, 63.9, (4, 8), 64) == (3, 0)


def test_cell_bounds_and_crop_box():
    assert cell_bounds(1, 2, (7, 7), 224) == (64.0, 32.0, 96.0, 64.0)
    x0, y0, x1, y1 = crop_box(0, 0, (28, 28), 224)  # corner: shifted inside, not shrunk
    assert (x0, y0) == (0, 0) and x1 - x0 == y1 - y0 == 32
    x0, y0, x1, y1 = crop_box(6, 6, (7, 7), 224)
    assert (x1, y1) == (224, 224) and x1 - x0 == 96
    assert crop_box(3, 3, (7, 7), 224) == (64, 64, 160, 160)


def test_images_by_best_patch_keeps_first_occurrence_order():
    ids = np.array([5 * 4 + 1, 2 * 4 + 3, 5 * 4 + 0, 9 * 4, 2 * 4])
    np.testing.assert_array_equal(images_by_best_patch(ids, 4), [5, 2, 9])


def test_paging_helpers():
    from hoverlay.explorer.paging import (
        ALL_LABELS,
        candidate_ids,
        n_pages,
        ordered_ids,
        page_containing,
        page_of,
    )

    ok = np.array([True, True, False, True, True, True])
    labels = np.array(["a", "b", "a", "a", "b", "a"], dtype=object)
    assert candidate_ids(ok, labels).tolist() == [0, 1, 3, 4, 5]
    cand = candidate_ids(ok, labels, "a")
    assert cand.tolist() == [0, 3, 5]
    assert candidate_ids(ok, labels, ALL_LABELS).size == 5
    rnd = ordered_ids(cand, "random", seed=3)
    assert sorted(rnd.tolist()) == [0, 3, 5]
    assert ordered_ids(cand, "random", seed=3).tolist() == rnd.tolist()  # seeded
    # the ranked candidates first, then every other candidate (the search found no patch of 3)
    assert ordered_ids(cand, "similar", ranked=[5, 4, 0]).tolist() == [5, 0, 3]
    assert n_pages(0, 16) == 1 and n_pages(33, 16) == 3
    ids = np.arange(10)
    assert page_of(ids, 2, 4).tolist() == [8, 9]
    assert page_of(ids, 99, 4).tolist() == [8, 9]  # clipped to the last page
    assert page_containing(ids, 9, 4) == 2 and page_containing(ids, 42, 4) is None
