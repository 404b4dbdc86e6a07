"""Coarse centroids: the split of lists over coarse clusters and two-level k-means in an index."""

import dataclasses

import numpy as np
import pytest

from hoverlay.stores import PatchIndex
from hoverlay.stores.kmeans import TWO_LEVEL_FROM, ivf_centroids, kmeans, split_counts
from hoverlay.stores.synthetic import clustered_activations


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
    assert index.meta.kmeans == "two-level" and index.is_trained
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
    assert index.is_trained and index.meta.kmeans == "two-level"
    assert faiss.extract_index_ivf(index.index).quantizer.ntotal == TWO_LEVEL_FROM
    index.add(x, np.arange(len(x)))
    index.set_params(nprobe=256)
    _, ids = index.search(x[:100], 50)
    # each vector is among its own candidates (4-bit codes: not always); centroids computed in
    # the wrong space (before the rotation) would put it in the wrong lists: near 0
    assert np.mean([i in row for i, row in enumerate(ids)]) > 0.7


def test_grouped_centroids_assign_vectors_to_their_nearest_list():
    import faiss

    from hoverlay.stores.kmeans import CentroidGroups

    rng = np.random.default_rng(4)
    x = _unit(clustered_activations(rng, (30_000, 24), local_dim=8)).astype(np.float32)
    centroids = ivf_centroids(x[:20_000], 400)
    groups = CentroidGroups.build(centroids)
    assert sorted(np.concatenate(groups.members).tolist()) == list(range(400))  # each centroid once
    _, exact = faiss.knn(x[20_000:], centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)
    got = groups.assign(x[20_000:])
    assert np.mean(got == exact.ravel()) > 0.97
    np.testing.assert_array_equal(groups.assign(x[20_000:], groups=len(groups.centres)), exact.ravel())


def test_a_large_ivf_index_adds_through_grouped_centroids_like_faiss_does():
    import faiss

    rng = np.random.default_rng(5)
    x = _unit(clustered_activations(rng, (50_000, 16), local_dim=6)).astype(np.float32)
    ours = PatchIndex.create(16, f"IVF{TWO_LEVEL_FROM},SQ8")
    ours.train(x[:30_000])
    theirs = PatchIndex(faiss.clone_index(ours.index), dataclasses.replace(ours.meta))
    ids = np.arange(len(x)) * 3  # patch ids need not be dense
    ours.add(x, ids)
    assert ours._groups is not None and ours.ntotal == len(x)
    theirs.index.add_with_ids(x, ids)  # FAISS's own assignment (flat quantizer: exact)
    a, b = faiss.extract_index_ivf(ours.index), faiss.extract_index_ivf(theirs.index)
    sizes_a = np.array([a.invlists.list_size(i) for i in range(a.nlist)])
    sizes_b = np.array([b.invlists.list_size(i) for i in range(b.nlist)])
    assert np.abs(sizes_a - sizes_b).sum() / len(x) < 0.04  # < 2% of the vectors in another list
    for index in (ours, theirs):
        index.set_params(nprobe=TWO_LEVEL_FROM)  # every list: the same answers whatever the lists
    _, got = ours.search(x[:50], 5)
    _, want = theirs.search(x[:50], 5)
    np.testing.assert_array_equal(got[:, 0], ids[:50])
    np.testing.assert_array_equal(got[:, 0], want[:, 0])
