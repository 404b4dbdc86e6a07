"""NMF groups: the numeric kernels, the out-of-core store pass, the stored contract, the CLI."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr

from hoverlay.cli import main
from hoverlay.pipeline import nmf_kernels as nk
from hoverlay.pipeline.factorize import (
    FactorizeUsageError,
    factorize,
    select_images,
)
from hoverlay.stores import LayerGeometry, StoreWriter, create_store, open_store
from hoverlay.stores.format import layer_path
from hoverlay.stores.groups import REQUIRED_ATTRS, read_group_meta, read_group_weights, read_groups
from hoverlay.stores.synthetic import make_synthetic_store

GEO = LayerGeometry(4, 4, 8)
FAILED = (3,)


def signed_store(url: str, n: int = 24, chunk: int = 8) -> np.ndarray:
    """A store whose layer 'l' has negative activations (like a block output without ReLU),
    labels alternating a/b and image 3 failed; returns the activations that were written."""
    writer = create_store(url, model={"spec": "test"}, preprocessing={"kind": "test"}, image_size=8,
                          layers={"l": GEO}, chunk=chunk)
    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((n, GEO.height, GEO.width, GEO.dim)) + 0.5).astype(np.float32)
    acts[list(FAILED)] = 0
    start = writer.reserve(n)
    writer.write_block(start, np.zeros((n, 8, 8, 3), dtype=np.uint8), {"l": acts})
    writer.write_table(start, [
        {"source": f"test://{i}", "label": "ab"[i % 2], "hash": f"h{i}",
         "status": "failed" if i in FAILED else "ok", "reason": "broken" if i in FAILED else ""}
        for i in range(n)])
    writer.commit(start + n)
    return acts


# -------------------------------------------------------------------------------------- kernels
def test_minibatch_fit_reconstructs_low_rank_matrix():
    rng = np.random.default_rng(0)
    n, dim, k, rows = 4000, 24, 5, 400
    w0 = rng.gamma(1.0, 1.0, (n, k)).astype(np.float32)
    h0 = np.abs(rng.standard_normal((k, dim))).astype(np.float32)
    h0[h0 < 0.5] = 0
    x = w0 @ h0

    def epoch_blocks(epoch: int):
        order = np.random.default_rng([1, epoch]).permutation(n)
        for lo in range(0, n, rows):
            yield x[np.sort(order[lo:lo + rows])]

    fit = nk.fit_blocks(epoch_blocks, k, total_rows=n, rows_per_block=rows, epochs=2, tol=0)
    assert fit.steps == 2 * n // rows  # every block went through partial_fit
    components, _ = nk.unit_components(fit.model)
    err = norm = 0.0
    for lo in range(0, n, rows):
        block = x[lo:lo + rows]
        e, s = nk.squared_errors(block, nk.transform_block(fit.model, block), components)
        err, norm = err + e, norm + s
    assert np.sqrt(err / norm) < 0.05
    # the true parts are found: each true component has a fitted one at cosine > 0.95
    truth = h0 / np.linalg.norm(h0, axis=1, keepdims=True)
    assert (truth @ components.T).max(axis=1).min() > 0.95


def test_negative_policies_and_groups_kernels():
    block = np.array([[1.0, -2.0], [-1.0, 3.0]], dtype=np.float32)
    stats = nk.InputStats()
    stats.update(block)
    assert stats.negative_mass_fraction == pytest.approx(3 / 7)
    np.testing.assert_array_equal(nk.make_nonnegative(block.copy(), "clip"), [[1, 0], [0, 3]])
    shift = nk.channel_shift(stats.channel_min)
    np.testing.assert_array_equal(shift, [1, 2])
    np.testing.assert_array_equal(nk.make_nonnegative(block.copy(), "shift", shift=shift),
                                  [[2, 0], [0, 5]])
    with pytest.raises(nk.NegativeActivationsError, match="'blk'"):
        nk.make_nonnegative(block.copy(), "error", layer="blk")
    groups = nk.assign_groups(np.array([[0.1, 0.5], [0.0, 0.0], [2.0, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(groups, [1, -1, 0])
    assert groups.dtype == np.int16


# --------------------------------------------------------------------------------------- store
def test_factorize_writes_groups_weights_and_attrs(tmp_path):
    url = str(tmp_path / "s.zarr")
    acts = signed_store(url)
    reader = open_store(url)
    assert read_groups(reader, "l", [0, 1]) is None and read_group_weights(reader, "l", 0) is None

    summary = factorize(url, "l", k=3, images="label=b", batch_images=8, quiet=True)

    result = read_groups(reader, "l", np.arange(reader.n_images))
    assert result is not None
    groups, meta = result
    weights = read_group_weights(reader, "l", np.arange(reader.n_images))
    assert groups.shape == (24, 4, 4) and groups.dtype == np.int16
    assert weights.shape == (24, 4, 4, 3) and weights.dtype == np.float16
    assert set(REQUIRED_ATTRS) <= set(meta)
    assert meta["method"] == "MiniBatchNMF" and meta["negative"] == "clip" and meta["k"] == 3
    assert meta["format_version"] == 1 and meta["images"] == "label=b"
    assert meta["components"].shape == (3, GEO.dim)
    np.testing.assert_allclose(np.linalg.norm(meta["components"], axis=1), 1, rtol=1e-5)
    chosen = np.array([i % 2 == 1 and i not in FAILED for i in range(24)])
    assert meta["images_factorized"] == summary["images_factorized"] == chosen.sum() == 11
    assert meta["images_skipped_failed"] == 1  # image 3 has label b but failed
    assert (groups[~chosen] == -1).all() and (weights[~chosen] == 0).all()
    assert (groups[chosen] >= 0).all()
    np.testing.assert_array_equal(groups[chosen], np.argmax(weights[chosen], axis=-1))
    # clipped mass is reported and the stored weights x components reconstruct ReLU(a)
    a = acts[chosen]
    assert meta["clipped_mass_fraction"] == pytest.approx(-a[a < 0].sum() / np.abs(a).sum(), rel=1e-2)
    relu = np.maximum(a, 0)
    approx = weights[chosen].astype(np.float32) @ meta["components"]
    rel = np.linalg.norm(relu - approx) / np.linalg.norm(relu)
    assert rel == pytest.approx(meta["reconstruction_error"], abs=0.01)
    assert sum(meta["group_sizes"]) + meta["patches_without_group"] == 11 * GEO.patches_per_image
    assert dict(zarr.open_group(url, mode="r").attrs)["hoverlay"]["committed"] == 24  # root intact


def test_negative_error_names_layer_and_writes_nothing(tmp_path):
    url = str(tmp_path / "s.zarr")
    signed_store(url)
    with pytest.raises(nk.NegativeActivationsError, match="layer 'l'"):
        factorize(url, "l", k=2, negative="error", quiet=True)
    assert read_group_meta(open_store(url), "l") is None


def test_shift_policy_keeps_negative_information(tmp_path):
    url = str(tmp_path / "s.zarr")
    signed_store(url)
    factorize(url, "l", k=2, negative="shift", batch_images=8, quiet=True)
    meta = read_group_meta(open_store(url), "l")
    assert meta["negative"] == "shift" and meta["clipped_mass_fraction"] == 0
    assert meta["negative_mass_fraction"] > 0
    assert len(meta["shift"]) == GEO.dim and min(meta["shift"]) > 0


def test_groups_without_attrs_are_absent_and_appended_images_have_no_group(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer = make_synthetic_store(url, 16, layers={"l": GEO}, image_size=8, chunk=8)
    group = StoreWriter.open(url).group
    group.create_array(layer_path("l", "groups"), shape=(16, 4, 4), dtype="int16", fill_value=-1)
    reader = open_store(url)
    assert read_groups(reader, "l", [0]) is None  # being written: no attributes yet
    factorize(url, "l", k=2, quiet=True)
    assert (read_groups(reader, "l", 5)[0] >= 0).all()
    start = writer.reserve(8)
    writer.write_block(start, np.zeros((8, 8, 8, 3), np.uint8),
                       {"l": np.ones((8, 4, 4, GEO.dim), np.float32)})
    writer.write_table(start, [{"hash": f"new{i}"} for i in range(8)])
    writer.commit(start + 8)
    reader.refresh()
    groups, meta = read_groups(reader, "l", [5, 20])
    assert meta["images_covered"] == 16 and (groups[0] >= 0).all() and (groups[1] == -1).all()


def test_memory_stays_bounded_by_the_minibatch(tmp_path):
    # D=128 rather than 16 so the full matrix dwarfs the fixed allocations of zarr's async I/O
    url = str(tmp_path / "big.zarr")
    geo = LayerGeometry(8, 8, 128)
    n, batch = 256, 8
    make_synthetic_store(url, n, layers={"l": geo}, image_size=8, chunk=8)
    stored_vector_bytes = n * geo.patches_per_image * geo.dim * 2  # float16
    minibatch_bytes = batch * geo.patches_per_image * geo.dim * 2
    full_matrix_bytes = n * geo.patches_per_image * geo.dim * 4  # float32, what NMF would need
    assert stored_vector_bytes >= 10 * minibatch_bytes
    tracemalloc.start()
    try:
        factorize(url, "l", k=4, batch_images=batch, epochs=1, quiet=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_matrix_bytes / 4, (peak, full_matrix_bytes)


# ----------------------------------------------------------------------------- selection / CLI
def test_select_images(tmp_path):
    url = str(tmp_path / "s.zarr")
    signed_store(url)
    table = open_store(url).table()
    ids, desc, skipped = select_images(table, "0-5,7")
    assert list(ids) == [0, 1, 2, 4, 5, 7] and desc == "ids=0-5,7" and skipped == 1
    ids, desc, _ = select_images(table, [2, 1])
    assert list(ids) == [1, 2] and desc == "ids=1-2"
    assert len(select_images(table, None)[0]) == 23
    with pytest.raises(FactorizeUsageError, match="COLUMN=VALUE"):
        select_images(table, "colour=red")
    with pytest.raises(FactorizeUsageError, match="no ok images"):
        select_images(table, "label=zebra")


def test_cli_exit_codes(tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    signed_store(url)
    base = ["factorize", "--store", url, "--layer", "l", "--k", "2", "-q"]
    assert main([*base, "--negative", "error"]) == 4
    assert "layer 'l'" in capsys.readouterr().err
    assert main([*base, "--images", "label=nope"]) == 2
    assert main([*base, "--k", "two"]) == 2
    assert "--k: 'two' is not a positive integer" in capsys.readouterr().err
    assert main([*base, "--negative", "flip"]) == 2
    assert "one of clip, shift, error" in capsys.readouterr().err
    assert main(base) == 0
    assert "clipped" in capsys.readouterr().out


def test_a_signed_layer_is_named_before_the_work_with_a_non_negative_neighbour(tmp_path, capsys):
    url = str(tmp_path / "two.zarr")
    writer = create_store(url, model={"spec": "test"}, preprocessing={"kind": "test"}, image_size=8,
                          layers={"signed": GEO, "relu": GEO}, chunk=8)
    rng = np.random.default_rng(1)
    acts = (rng.standard_normal((8, GEO.height, GEO.width, GEO.dim))).astype(np.float32)
    start = writer.reserve(8)
    writer.write_block(start, np.zeros((8, 8, 8, 3), np.uint8), {"signed": acts, "relu": np.maximum(acts, 0)})
    writer.write_table(start, [{"source": f"t://{i}", "hash": f"h{i}"} for i in range(8)])
    writer.commit(8)
    summary = factorize(url, "signed", k=2, quiet=True)
    advice = summary["signed_layer_advice"]
    assert "'signed' is signed" in advice and "'relu' is non-negative" in advice
    assert "% of its activation mass" in advice and "negative=clip sets them to 0" in advice
    assert advice in capsys.readouterr().err  # said even with quiet (a warning, not progress)
    assert factorize(url, "relu", k=2, quiet=True)["signed_layer_advice"] is None


def test_a_signed_layer_of_a_real_model_gets_the_models_nearest_non_negative_layer(demo_subset, tmp_path):
    from hoverlay.pipeline.build import build

    url = str(tmp_path / "add.zarr")
    build(demo_subset, url, layers=["_blocks.10.add"], quiet=True, index=False)
    summary = factorize(url, "_blocks.10.add", k=3, quiet=True)
    advice = summary["signed_layer_advice"]
    assert "'_blocks.10.add' is signed" in advice
    assert "nearest non-negative layer of the model is '_blocks.11._swish' (D=672, 14x14)" in advice
    assert 0.2 < summary["clipped_mass_fraction"] < 0.8  # what the advice is about
