"""Writer -> reader round trips on real Zarr stores on disk (and one fsspec memory:// URL)."""

import json
import os

import numpy as np
import pytest

from hoverlay.stores import (
    FormatVersionError,
    LayerGeometry,
    NotAStoreError,
    OutOfRangeError,
    PatchIndex,
    StoreError,
    StoreMismatchError,
    UnknownLayerError,
    create_store,
    open_store,
    search_reranked,
)
from hoverlay.stores.index import exact_rerank
from hoverlay.stores.search import LayerSearch

LAYERS = {"a": LayerGeometry(4, 3, 8), "b": LayerGeometry(2, 2, 16)}


def _acts(rng, n):
    acts = {k: rng.standard_normal((n, g.height, g.width, g.dim)).astype(np.float32) * rng.uniform(0.1, 10)
            for k, g in LAYERS.items()}
    acts["a"][0, 0, 0] = 0  # a zero vector must stay finite
    return acts


def _new_store(path, chunk=4):
    return create_store(path, model={"spec": "test"}, preprocessing={"kind": "none"}, image_size=8,
                        layers=LAYERS, chunk=chunk)


def test_round_trip_vectors_norms_table(tmp_path):
    rng = np.random.default_rng(0)
    w = _new_store(tmp_path / "s")
    n = 6
    acts = _acts(rng, n)
    pixels = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    start = w.reserve(n)
    w.write_block(start, pixels, acts)
    rows = [{"source": f"/x/{i}.png", "label": "cat" if i % 2 else "dog", "hash": f"h{i}"} for i in range(n)]
    rows[3].update(status="failed", reason="truncated")
    w.write_table(start, rows)
    w.commit(n)

    r = open_store(tmp_path / "s")
    assert r.n_images == n and r.layers == ["a", "b"]
    np.testing.assert_array_equal(r.pixels(slice(None)), pixels)
    for name in LAYERS:
        v = r.vectors(name, slice(None)).astype(np.float64)
        assert v.dtype == np.float64 and r.vectors(name, 0).dtype == np.float16
        norms = np.linalg.norm(acts[name].astype(np.float64), axis=-1)
        np.testing.assert_allclose(r.norms(name, slice(None)), norms, rtol=1e-6)
        lengths = np.linalg.norm(v, axis=-1)
        nonzero = norms > 0
        np.testing.assert_allclose(lengths[nonzero], 1.0, atol=2e-3)  # fp16 rounding
        np.testing.assert_allclose(v, acts[name] / np.where(norms > 0, norms, 1)[..., None], atol=1e-3)
    assert np.all(r.vectors("a", 0)[0, 0] == 0)
    t = r.table()
    assert list(t["label"]) == [row["label"] for row in rows]
    assert list(t["status"]) == ["ok", "ok", "ok", "failed", "ok", "ok"]
    assert t.row(3)["reason"] == "truncated" and t.row(0)["base_id"] == -1


def test_uncommitted_append_is_invisible_and_dropped_on_resume(tmp_path):
    rng = np.random.default_rng(1)
    w = _new_store(tmp_path / "s")
    w.reserve(4)
    w.write_block(0, np.zeros((4, 8, 8, 3), np.uint8), _acts(rng, 4))
    w.write_table(0, [{"hash": f"h{i}"} for i in range(4)])
    w.commit(4)
    # a second append that never commits (a crash)
    w.reserve(3)
    w.write_block(4, np.zeros((3, 8, 8, 3), np.uint8), _acts(rng, 3))
    w.write_table(4, [{"hash": f"x{i}"} for i in range(3)])
    r = open_store(tmp_path / "s")
    assert r.n_images == 4 and len(r.table()) == 4
    with pytest.raises(OutOfRangeError, match="image id 4"):
        r.vectors("a", [4])
    # the next writer reserves from the commit, dropping the crashed tail
    from hoverlay.stores import StoreWriter

    w2 = StoreWriter.open(tmp_path / "s")
    assert set(w2.known_hashes()) == {"h0", "h1", "h2", "h3"}
    assert w2.reserve(1) == 4
    assert w2.group["images/pixels"].shape[0] == 5
    # refresh() sees a commit made by another handle
    w2.write_block(4, np.zeros((1, 8, 8, 3), np.uint8), _acts(rng, 1))
    w2.write_table(4, [{"hash": "h4"}])
    w2.commit(5)
    assert r.refresh() and r.n_images == 5 and r.table()["hash"][4] == "h4"


def test_fsspec_url_store(tmp_path):
    rng = np.random.default_rng(2)
    w = _new_store("memory://hoverlay-test/s")
    w.reserve(2)
    w.write_block(0, np.ones((2, 8, 8, 3), np.uint8), _acts(rng, 2))
    w.write_table(0, [{"hash": "a"}, {"hash": "b"}])
    w.commit(2)
    r = open_store("memory://hoverlay-test/s")
    assert r.n_images == 2 and r.vectors("b", 1).shape == (2, 2, 16)
    assert r.vectors_dask("a").shape == (2, 4, 3, 8)


def test_dask_view_matches_numpy(tmp_path):
    rng = np.random.default_rng(3)
    w = _new_store(tmp_path / "s", chunk=2)
    w.reserve(5)
    w.write_block(0, np.zeros((5, 8, 8, 3), np.uint8), _acts(rng, 5))
    w.commit(5)
    r = open_store(tmp_path / "s")
    lazy = r.vectors_dask("a")
    assert lazy.chunks[0] == (2, 2, 1)
    np.testing.assert_array_equal(lazy.compute(), r.vectors("a", slice(None)))


def test_errors_name_the_bad_value(tmp_path):
    with pytest.raises(NotAStoreError, match="nowhere"):
        open_store(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hi")
    with pytest.raises(NotAStoreError, match="plain"):
        open_store(tmp_path / "plain")
    w = _new_store(tmp_path / "s")
    w.reserve(1)
    w.write_block(0, np.zeros((1, 8, 8, 3), np.uint8), _acts(np.random.default_rng(0), 1))
    w.commit(1)
    r = open_store(tmp_path / "s")
    with pytest.raises(UnknownLayerError, match="'nope'"):
        r.vectors("nope", 0)
    with pytest.raises(OutOfRangeError, match="image id 1 "):
        r.pixels(1)
    with pytest.raises(OutOfRangeError, match="y 4"):
        r.patch_id("a", 0, 4, 0)
    with pytest.raises(OutOfRangeError, match="patch id 12"):
        r.patch_vectors("a", np.array([12]))
    with pytest.raises(StoreError, match="already exists"):
        _new_store(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match="layers"):
        w.check_compatible(model={"spec": "test"}, preprocessing={"kind": "none"}, image_size=8, layers=["a"])
    with pytest.raises(StoreMismatchError, match="model"):
        w.check_compatible(model={"spec": "other"}, preprocessing={"kind": "none"}, image_size=8, layers=["a", "b"])
    # a newer format version
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["hoverlay"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="format_version 99"):
        open_store(tmp_path / "s")


def _indexed_store(tmp_path, n=20):
    rng = np.random.default_rng(4)
    w = _new_store(tmp_path / "s")
    w.reserve(n)
    w.write_block(0, np.zeros((n, 8, 8, 3), np.uint8), _acts(rng, n))
    w.write_table(0, [{"hash": str(i)} for i in range(n)])
    w.commit(n)
    r = open_store(tmp_path / "s")
    vecs = r.vectors("b", slice(None)).reshape(-1, 16)
    return r, vecs


def test_index_returns_stored_vector_first(tmp_path):
    r, vecs = _indexed_store(tmp_path)
    index = PatchIndex.create(16, "IDMap,Flat")
    index.add(vecs, np.arange(len(vecs)))
    index.meta.images_indexed = r.n_images
    index.save(r.url, "b")
    loaded = PatchIndex.load(r.url, "b", mmap=True)
    fetch = lambda ids: r.patch_vectors("b", ids)  # noqa: E731
    for pid in (0, 37, len(vecs) - 1):
        scores, ids = search_reranked(loaded, vecs[pid].astype(np.float32), 5, fetch)
        assert ids[0] == pid and abs(scores[0] - 1) < 2e-3
    search = LayerSearch(r, "b")
    assert search.warning is None
    top = search.search(search.query_vector(3, 1, 0), 4)
    assert top.ids[0] == r.patch_id("b", 3, 1, 0) and not top.exact


def test_rerank_is_exact(tmp_path):
    r, vecs = _indexed_store(tmp_path)
    q = np.random.default_rng(9).standard_normal(16).astype(np.float32)
    cand = np.random.default_rng(10).choice(len(vecs), 30, replace=False)
    scores, ids = exact_rerank(q, cand, lambda ids: r.patch_vectors("b", ids), 7)
    ref = vecs[cand].astype(np.float64) @ q.astype(np.float64)
    order = np.argsort(-ref)[:7]
    np.testing.assert_array_equal(ids, cand[order])
    np.testing.assert_allclose(scores, ref[order], rtol=1e-5, atol=1e-5)


def test_stale_or_missing_index_falls_back_to_exact(tmp_path):
    r, vecs = _indexed_store(tmp_path)
    s = LayerSearch(r, "b")
    assert s.index is None and "no index" in s.warning
    index = PatchIndex.create(16, "IDMap,Flat")
    index.add(vecs[:40], np.arange(40))
    index.meta.images_indexed = 10
    index.save(r.url, "b")
    s = LayerSearch(r, "b")  # covers the first 10 images: index for them, exact scan for the rest
    assert s.index is not None and s.scan_from == 10 and "stale" in s.warning
    top = s.search(vecs[70].astype(np.float32), 3)
    assert top.method == "index + exact scan of the newer images" and top.ids[0] == 70
    index.meta.images_indexed = r.n_images + 5  # an index of a store since rebuilt smaller: unusable
    index.save(r.url, "b")
    s = LayerSearch(r, "b")
    assert s.index is None and "stale" in s.warning
    top = s.search(vecs[70].astype(np.float32), 3)
    assert top.exact and top.method == "exact scan" and top.ids[0] == 70
    # .faiss replaced but .json not (a crash between the two renames) -> detected as stale
    path = os.path.join(r.url, "index", "b.json")
    meta = json.loads(open(path).read())
    meta["ntotal"] = 999
    open(path, "w").write(json.dumps(meta))
    with pytest.raises(StoreError, match="stale"):
        PatchIndex.load(r.url, "b")


def test_synthetic_clusters_with_a_local_dim_have_real_activations_local_dimension():
    from bench.intrinsic import local_intrinsic_dimension
    from hoverlay.stores.synthetic import clustered_activations

    rng = np.random.default_rng(0)
    isotropic = local_intrinsic_dimension(clustered_activations(rng, (5000, 128)))
    local = local_intrinsic_dimension(clustered_activations(rng, (5000, 128), local_dim=8))
    assert isotropic > 25 and 3 < local < 12, (isotropic, local)
    acts = clustered_activations(rng, (2, 7, 128), local_dim=8)
    assert acts.shape == (2, 7, 128) and acts.dtype == np.float32 and acts.min() >= 0
    with pytest.raises(ValueError, match="local_dim"):
        clustered_activations(rng, (10, 16), local_dim=17)


def test_reads_of_any_id_order_equal_single_image_reads(tmp_path):
    """Reads go through slices of consecutive runs (fast in Zarr 3): any order, repeats, gaps."""
    from hoverlay.stores import LayerGeometry, open_store
    from hoverlay.stores.reader import consecutive_runs
    from hoverlay.stores.synthetic import make_synthetic_store

    assert consecutive_runs(np.array([4, 5, 6, 9, 2, 2, 3])) == [(4, 7), (9, 10), (2, 3), (2, 4)]
    assert consecutive_runs(np.array([], np.int64)) == []
    url = str(tmp_path / "s")
    make_synthetic_store(url, 20, layers={"l": LayerGeometry(3, 3, 4)}, image_size=8, chunk=4)
    r = open_store(url)
    for ids in ([7, 8, 9, 10, 11], [19, 3, 3, 4, 0, 12], [5], list(range(19, -1, -1))):
        a = np.array(ids)
        np.testing.assert_array_equal(r.pixels(a), np.stack([r.pixels(int(i)) for i in ids]))
        np.testing.assert_array_equal(r.vectors("l", a), np.stack([r.vectors("l", int(i)) for i in ids]))
        np.testing.assert_array_equal(r.norms("l", a), np.stack([r.norms("l", int(i)) for i in ids]))
    assert r.pixels(np.array([[1, 2], [3, 9]])).shape == (2, 2, 8, 8, 3)  # the selection's shape is kept
