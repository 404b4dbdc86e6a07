"""Coarse centroids: the split of lists over coarse clusters and two-level k-means in an index."""

import numpy as np
import pytest

from stores import PatchIndex
from stores.kmeans import TWO_LEVEL_FROM, ivf_centroids, kmeans, split_counts
from stores.synthetic import clustered_activations


def test_split_counts_is_proportional_exact_and_never_exceeds_a_clusters_points():
    sizes = np.array([5, 0, 3, 100, 1])
    counts = split_counts(sizes, 20)
    assert counts.sum() == 20 and np.all(counts <= sizes) and counts[1] == 0
    assert counts[3] == 18  # 100/109 of 20 = 18.3
    np.testing.assert_array_equal(split_counts(sizes, int(sizes.sum())), sizes)
    with pytest.raises(ValueError, match="cannot split"):
        split_counts(sizes, 110)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_two_level_centroids_cluster_about_as_well_as_one_kmeans():
    rng = np.random.default_rng(0)
    x = _unit(clustered_activations(rng, (40_000, 32), local_dim=8)).astype(np.float32)
    nlist = TWO_LEVEL_FROM
    two = ivf_centroids(x, nlist)
    assert two.shape == (nlist, 32)
    np.testing.assert_allclose(np.linalg.norm(two, axis=1), 1, rtol=1e-5)

    def fit(c):  # mean cosine of each point to its nearest centroid
        return float(np.mean(np.max(x[:5000] @ c.T, axis=1)))

    one = kmeans(x, nlist)
    assert fit(two) > fit(one) - 0.01
    assert fit(two) > fit(x[rng.choice(len(x), nlist, replace=False)])  # better than random points


def test_an_index_past_two_level_from_trains_two_level_and_finds_neighbours():
    rng = np.random.default_rng(1)
    x = _unit(clustered_activations(rng, (60_000, 16), local_dim=6)).astype(np.float32)
    index = PatchIndex.create(16, f"IVF{TWO_LEVEL_FROM},Flat")
    index.train(x[:40_000])
    assert index.meta["kmeans"] == "two-level" and index.is_trained
    ivf = __import__("faiss").extract_index_ivf(index.index)
    assert ivf.quantizer.ntotal == TWO_LEVEL_FROM
    index.add(x, np.arange(len(x)))
    index.set_params(nprobe=64)
    _, ids = index.search(x[:200], 1)
    assert np.mean(ids[:, 0] == np.arange(200)) > 0.97  # each vector finds itself


def test_an_hnsw_quantizer_keeps_its_search_setting_after_adding():
    import faiss

    rng = np.random.default_rng(2)
    x = _unit(clustered_activations(rng, (20_000, 16), local_dim=6)).astype(np.float32)
    index = PatchIndex.create(16, "IVF64_HNSW32,SQ8")
    index.train(x)
    index.set_params(nprobe=40)
    hnsw = faiss.downcast_index(faiss.extract_index_ivf(index.index).quantizer)
    assert hnsw.hnsw.efSearch == 80
    index.add(x, np.arange(len(x)))
    assert hnsw.hnsw.efSearch == 80 and index.ntotal == len(x)


def test_two_level_training_goes_through_an_opq_rotation():
    import faiss

    rng = np.random.default_rng(3)
    x = _unit(clustered_activations(rng, (40_000, 16), local_dim=6)).astype(np.float32)
    index = PatchIndex.create(16, f"OPQ4,IVF{TWO_LEVEL_FROM}_HNSW32,PQ4x4")  # 4-bit: quick to train
    index.train(x[:8_000])
    assert index.is_trained and index.meta["kmeans"] == "two-level"
    assert faiss.extract_index_ivf(index.index).quantizer.ntotal == TWO_LEVEL_FROM
    index.add(x, np.arange(len(x)))
    index.set_params(nprobe=256)
    _, ids = index.search(x[:100], 50)
    # each vector is among its own candidates (4-bit codes: not always); centroids computed in
    # the wrong space (before the rotation) would put it in the wrong lists: near 0
    assert np.mean([i in row for i, row in enumerate(ids)]) > 0.7
