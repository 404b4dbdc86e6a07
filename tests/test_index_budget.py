"""Issue #16: the index ladder's graph rung, exact scans for small layers, the memory budget at
every size (index + re-rank file) and an unmeetable one refused before a build writes anything,
tie-aware recall, and held-out queries — on real FAISS builds of small stores."""

import logging
import os
import re

import faiss
import numpy as np
import pytest
from conftest import write_generated_images

from hoverlay.cli import main
from hoverlay.errors import EXIT_INPUT
from hoverlay.pipeline.build import build
from hoverlay.pipeline.indexing import update_index
from hoverlay.stores import IndexBudgetError, LayerGeometry, PatchIndex, open_store
from hoverlay.stores.errors import StoreError
from hoverlay.stores.index import (
    FLAT_MAX_VALUES,
    check_index_budget,
    choose_index,
    estimate_index_bytes,
    exact_scan_ms,
    recall_per_query,
    smallest_index,
)
from hoverlay.stores.rerank import rerank_path
from hoverlay.stores.search import LayerSearch
from hoverlay.stores.synthetic import clustered_activations, make_synthetic_store, synthetic_pixels


def index_bytes(reader, layer="l") -> int:
    """What the layer's index holds: the .faiss file plus the re-rank file when there is one."""
    base = os.path.join(reader.url, "index", layer)
    f16 = rerank_path(reader.url, layer)
    return os.path.getsize(base + ".faiss") + (os.path.getsize(f16) if f16 and os.path.exists(f16) else 0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 images x 16 patches x D=32: 4,800 vectors, 154k values: an exact scan (~0.08 ms)."""
    path = tmp_path_factory.mktemp("small") / "s"
    make_synthetic_store(path, 300, layers={"l": LayerGeometry(4, 4, 32)}, image_size=8, chunk=16, local_dim=8)
    return open_store(path)


MEDIUM_IMAGES, MEDIUM_DIM = 500, 256


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """500 images x 16 patches x D=256: 8,000 vectors, 2.05M values: just past an exact scan's
    1 ms (FLAT_MAX_VALUES), so the ladder takes a graph. (D = 256 keeps FAISS's efConstruction
    40, and 8,000 vectors cost the graph what 16,000 at D = 128 would, in half the images.)"""
    assert MEDIUM_IMAGES * 16 * MEDIUM_DIM > FLAT_MAX_VALUES
    path = tmp_path_factory.mktemp("medium") / "s"
    make_synthetic_store(path, MEDIUM_IMAGES, layers={"l": LayerGeometry(4, 4, MEDIUM_DIM)}, image_size=8,
                         chunk=32, block=512, local_dim=8)
    return open_store(path)


def test_the_budget_holds_index_plus_rerank_file_below_the_exact_scan_bound(small):
    """#16: '1 MB asked, 13.4 MB flat index built' — below the flat threshold the budget was
    not looked at. Now every budget is met by the files on disk, or refused."""
    flat = update_index(small, "l", n_queries=20, rebuild=True).meta
    assert flat.factory == "IDMap,Flat" and index_bytes(small) <= flat.choice.index_bytes
    fp16_budget = flat.choice.index_bytes - 1
    fp16 = update_index(small, "l", memory_budget=fp16_budget, n_queries=20, rebuild=True).meta
    assert fp16.factory == "IDMap,SQfp16" and index_bytes(small) <= fp16_budget
    assert fp16.recall.value == 1.0 and fp16.recall.exact_index  # fp16 copies of fp16 vectors: exact
    tight = fp16.choice.index_bytes - 1  # no room for fp16 codes, so none for a re-rank file either
    meta = update_index(small, "l", memory_budget=tight, n_queries=10, rebuild=True).meta
    assert meta.choice.total_bytes <= tight and not meta.choice.rerank_file and meta.rerank is None
    assert not os.path.exists(rerank_path(small.url, "l"))
    assert index_bytes(small) <= tight, (meta.factory, index_bytes(small), tight)
    assert meta.recall.value >= 0.9  # re-ranked from the Zarr store: exact scores, slower
    search = LayerSearch(small, "l")
    q = search.query_vector(11, 2, 1).astype(np.float32)
    top = search.search(q, 5)
    np.testing.assert_allclose(top.scores, small.patch_vectors("l", top.ids).astype(np.float32) @ q, atol=1e-6)
    with pytest.raises(StoreError, match="below the smallest index"):
        update_index(small, "l", memory_budget=10_000, n_queries=20, rebuild=True)


def test_the_graph_rung_is_tuned_on_efsearch_and_medium_budgets_hold(medium, caplog):
    with caplog.at_level(logging.INFO, logger="hoverlay.pipeline.indexing"):
        meta = update_index(medium, "l", n_queries=60, rebuild=True).meta
    assert meta.factory == "IDMap,HNSW32_SQfp16"
    said = [r.getMessage() for r in caplog.records if "IDMap,HNSW32_SQfp16" in r.getMessage()]
    assert said and "HNSW graph" in said[0] and "budget" in said[0]  # the log says what and why
    assert meta.choice.factory == meta.factory and "HNSW" in meta.choice.reason and not meta.choice.rerank_file
    assert meta.choice.ef_construction and meta.rerank is None and not os.path.exists(rerank_path(medium.url, "l"))
    ef = meta.params["efSearch"]
    assert meta.tuned.ef_search == ef and meta.tuned.nprobe is None
    assert meta.tuned.lower_bound >= 0.95 and meta.recall.value >= 0.95
    assert "held out" in meta.recall.measured
    assert index_bytes(medium) <= meta.choice.index_bytes <= meta.choice.budget
    loaded = PatchIndex.load(medium.url, "l", mmap=True)
    graph = faiss.downcast_index(faiss.downcast_index(loaded.index).index)
    assert graph.hnsw.efSearch == ef and graph.hnsw.efConstruction == meta.choice.ef_construction
    assert loaded.ntotal == MEDIUM_IMAGES * 16  # the probe's held-out queries were added after tuning
    search = LayerSearch(medium, "l")
    q = search.query_vector(300, 3, 0)
    assert search.search(q, 10).ids[0] == medium.patch_id("l", 300, 3, 0)

    # budgets below the graph: smaller graph, then IVF lists; the files stay within each
    below = meta.choice.total_bytes - 1
    smaller = update_index(medium, "l", memory_budget=below, n_queries=30, rebuild=True).meta
    assert smaller.factory == "IDMap,HNSW16_SQfp16" and index_bytes(medium) <= below
    ivf_budget = smaller.choice.total_bytes - 1  # IVF lists of exact fp16 codes: no re-rank from Zarr
    ivf = update_index(medium, "l", memory_budget=ivf_budget, n_queries=30, rebuild=True).meta
    assert ivf.factory.startswith("IVF") and index_bytes(medium) <= ivf_budget, (ivf.factory, ivf_budget)
    assert ivf.tuned.nprobe == ivf.params["nprobe"] and ivf.tuned.ef_search is None


def test_extending_an_index_past_its_budget_rebuilds_it(tmp_path):
    from hoverlay.stores.synthetic import append_synthetic_images

    n = 100  # images, then as many again
    make_synthetic_store(tmp_path / "s", n, layers={"l": LayerGeometry(4, 4, 32)}, image_size=8, chunk=16)
    reader = open_store(tmp_path / "s")
    # room for float32 codes of n images, not of 2n (fp16 codes of 2n fit: an exact scan
    # again, so the rebuild needs no training and no tuning)
    budget = estimate_index_bytes("IDMap,SQfp16", 2 * n * 16, 32)
    assert estimate_index_bytes("IDMap,Flat", n * 16, 32) <= budget < estimate_index_bytes("IDMap,Flat", 2 * n * 16, 32)
    first = update_index(reader, "l", n_queries=10, memory_budget=budget).meta
    assert first.factory == "IDMap,Flat"
    append_synthetic_images(tmp_path / "s", n, seed=3)
    reader.refresh()
    grown = update_index(reader, "l", n_queries=10, memory_budget=budget).meta
    assert grown.factory == "IDMap,SQfp16" and index_bytes(reader) <= budget
    assert grown.ntotal == 2 * n * 16 and grown.recall.value == 1.0


def test_recall_counts_a_hit_tied_with_the_kth_true_score():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[1, 2, 9], [4, 7, -1]])
    assert recall_per_query(found, truth).tolist() == pytest.approx([2 / 3, 1 / 3])
    kth = np.array([0.5, 0.8])
    scores = np.array([[0.9, 0.7, 0.5], [0.9, 0.79, -np.inf]])  # 9 ties the k-th; 7 falls short
    assert recall_per_query(found, truth, scores, kth).tolist() == pytest.approx([1.0, 1 / 3])


def test_an_exact_index_reports_recall_one_when_vectors_repeat(tmp_path):
    """#16: an exact IDMap,Flat reported recall@10 0.998 — real layers repeat vectors (uniform
    patches), and among equal scores the index and the exact scan keep different ids."""
    from hoverlay.stores.writer import create_store

    geo = LayerGeometry(4, 4, 16)
    writer = create_store(tmp_path / "s", model={"spec": "synthetic"}, preprocessing={}, image_size=8,
                          layers={"l": geo}, chunk=8)
    rng = np.random.default_rng(0)
    n = 96
    acts = clustered_activations(rng, (n, 4, 4, 16), local_dim=4)
    acts[:, :, 2:] = acts[0, :, 2:]  # half of every image's patches: the same 8 vectors, 96 times each
    start = writer.reserve(n)
    writer.write_block(start, synthetic_pixels(rng, n, 8), {"l": acts})
    writer.write_table(start, [{"source": f"x{i}", "label": "a", "hash": f"h{i}"} for i in range(n)])
    writer.commit(n)
    reader = open_store(tmp_path / "s")
    meta = update_index(reader, "l", factory="IDMap,Flat", n_queries=96, k=10).meta
    assert meta.recall.exact_index and meta.recall.value == 1.0, meta.recall


def test_bench_queries_are_held_out_of_the_store_and_the_build_probe_of_the_index(small):
    """#16: bench.index measured its 'held-out' recall with exclude=None (queries could be
    training points). Its queries are now fresh draws never stored, and asserted so."""
    from bench.index import assert_held_out, autofaiss_choice, held_out_queries, matched_setting
    from hoverlay.pipeline.indexing import _sample_patches

    stored = small.vectors("l", slice(0, small.n_images)).reshape(-1, 32).astype(np.float32)
    queries = held_out_queries(50, 32, 8)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1, atol=2e-3)  # unit, fp16-rounded
    nearest = stored[np.argmax(queries @ stored.T, axis=1)]
    assert_held_out(queries, nearest)
    assert (queries @ stored.T).max() < 1 - 1e-4  # no stored vector equals a query
    with pytest.raises(AssertionError, match="not held out"):
        assert_held_out(np.vstack([queries, stored[:1]]), np.vstack([nearest, stored[:1]]))

    # the build's own probe: stored patches that training never saw, held out of the index while
    # it is tuned (their recall is that of unseen queries), then added
    meta = update_index(small, "l", factory="IVF16,Flat", n_queries=20, rebuild=True, seed=0).meta
    train_ids, _ = _sample_patches(small, "l", meta.train_points, np.random.default_rng(0))
    probe_ids, _ = _sample_patches(small, "l", 20, np.random.default_rng(1), set(train_ids.tolist()), per_image=1)
    assert len(probe_ids) == 20 and not set(probe_ids.tolist()) & set(train_ids.tolist())
    assert "held out of the index" in meta.recall.measured and meta.ntotal == 300 * 16

    sweep = [{"efSearch": 8, "p50_ms": 0.05, "recall": 0.9}, {"efSearch": 16, "p50_ms": 0.08, "recall": 0.96},
             {"efSearch": 24, "p50_ms": 0.07, "recall": 0.985}]
    assert matched_setting(sweep, 0.95)["efSearch"] == 24  # the cheapest that reaches the target
    assert matched_setting(sweep, 0.99) is None
    assert autofaiss_choice(1_000_000, 512) == "HNSW32" and autofaiss_choice(10**9, 512) is None


def test_bench_graph_orders_reports_each_orders_recall_and_the_peer_size_is_measured_on_disk(tmp_path):
    """bench.graph_orders (how much of a graph's recall is its build's luck): the store's own
    order first, recall per efSearch against a float64 scan, never falling as efSearch grows;
    bench.index sizes a peer by writing it to disk (a second in-memory copy ran 10M x 112 out
    of memory)."""
    from bench.graph_orders import EF_SEARCH, order_recalls
    from bench.index import file_bytes, held_out_queries

    vectors, queries = held_out_queries(3000, 16, 8, seed=7), held_out_queries(40, 16, 8, seed=9)
    rows = order_recalls(vectors, queries, orders=2, ef_construction=40)
    assert [r["order"] for r in rows] == ["store", "shuffled 1"]
    for row in rows:
        recalls = [row[f"recall@ef{ef}"] for ef in EF_SEARCH]
        assert all(0 < r <= 1 for r in recalls) and recalls == sorted(recalls), row
    index = faiss.IndexFlatIP(16)
    index.add(vectors)
    assert file_bytes(index, str(tmp_path)) >= vectors.nbytes and not list(tmp_path.iterdir())


def test_small_layers_get_an_exact_scan_within_its_latency_bound():
    """#16: the 15-image demo's 2,940 x 672 layer got IDMap,HNSW32_SQfp16 at recall@10 0.973
    where a scan takes well under 1 ms. An exact scan is now taken while its estimated query
    cost (n·D at a fixed, conservative speed: no timing at build time) is within 1 ms."""
    demo = choose_index(2_940, 672)
    assert demo.factory == "IDMap,Flat" and exact_scan_ms(2_940, 672) <= 1.0 and "ms a query" in demo.reason
    assert choose_index(2_940, 672) == demo  # deterministic
    assert choose_index(3_136, 672).factory == "IDMap,HNSW32_SQfp16"  # 16 images: past 1 ms
    n112 = FLAT_MAX_VALUES // 112
    assert choose_index(n112, 112).factory == "IDMap,Flat" and choose_index(n112 + 1, 112).factory != "IDMap,Flat"
    # the budget still decides: fp16 copies when float32 does not fit, then the ladder below
    flat = choose_index(2_940, 672)
    assert choose_index(2_940, 672, flat.total_bytes - 1).factory == "IDMap,SQfp16"
    fp16 = choose_index(2_940, 672, flat.total_bytes - 1)
    assert not choose_index(2_940, 672, fp16.total_bytes - 1).factory.startswith("IDMap,")


def test_the_smallest_index_never_shrinks_as_vectors_are_added():
    """The build checks the budget before the forward, counting every new image as decoded; a
    failed decode only removes vectors, so the index phase's check must then pass too."""
    for dim in (8, 112, 672):
        sizes = [0, 1, 2, 50, 500, 2_000, 2_976, 2_977, 10_000, 40_000, 100_000, 2_000_001, 20_000_000]
        needs = [smallest_index(n, dim).total_bytes for n in sizes]
        assert needs == sorted(needs), (dim, needs)
    need = smallest_index(2_940, 672).total_bytes
    check_index_budget(need, {"l": (2_940, 672, None)})
    with pytest.raises(IndexBudgetError, match=f"smallest budget that works is --index-memory {need} "):
        check_index_budget(need - 1, {"l": (2_940, 672, None)})


TINY = ["--model", "python:test_build:tiny_model", "--layers", "1,3", "--size", "64"]
TINY_KW = {"model": "python:test_build:tiny_model", "layers": ["1", "3"], "size": 64}


def store_files(root) -> dict[str, bytes]:
    """Every file of a store and its bytes (the lock file's owner line aside: each build rewrites it)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = b"" if name == ".hoverlay.lock" else f.read()
    return out


def test_an_unmeetable_index_memory_is_refused_before_the_build_writes_anything(tmp_path, capsys):
    """#16: a budget below the smallest index was refused only at the index phase, after the
    images were committed (the store then said "unindexed"). Now the build refuses it before
    the forward, from each layer's (images x H x W) vectors: exit 4, one line with the smallest
    budget that works, and no store (or, for an append, the store as it was)."""
    images = str(tmp_path / "images")
    write_generated_images(images, 4, seed=3)
    store = tmp_path / "s"
    assert main(["build", "--images", images, "--store", str(store), "-q", *TINY, "--index-memory", "1"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index memory budget 1 B" in err, err
    need = int(re.search(r"smallest budget that works is --index-memory (\d+) ", err)[1])
    # the layers' geometry at 64 px: layer 1 is 16 x 16 x 8, layer 3 is 8 x 8 x 16
    assert need == max(smallest_index(4 * 256, 8).total_bytes, smallest_index(4 * 64, 16).total_bytes)
    assert not store.exists()

    assert main(["build", "--images", images, "--store", str(store), "-q", *TINY, "--no-index"]) == 0
    before = store_files(store)
    more = str(tmp_path / "more")
    write_generated_images(more, 2, seed=9)
    with pytest.raises(IndexBudgetError, match="below the smallest index") as refused:
        build(more, str(store), quiet=True, **TINY_KW, index_memory=need)  # enough for 4 images, not 6
    assert f"--index-memory {max(smallest_index(6 * 256, 8).total_bytes, smallest_index(6 * 64, 16).total_bytes)} " \
        in str(refused.value)
    assert store_files(store) == before and open_store(store).n_images == 4


def test_bench_fastscan_sweeps_each_index_and_reports_the_fastest_setting_per_recall_target(tmp_path):
    """bench.fastscan (is a 4-bit fast-scan PQ rung worth it?): each IVF index swept over nprobe x
    re-rank depth with held-out queries; with every list probed and the deepest re-rank the L2
    fast-scan codes find (nearly) the exact top-k; the summary names the cheapest setting that
    reaches each target, or None when none does."""
    from bench.fastscan import NPROBE, RERANK, K, fastest, ivf_rows
    from bench.index import exact_top_k, held_out_queries

    stored = held_out_queries(4000, 16, 8, seed=7).astype(np.float16)
    vectors, queries = stored.astype(np.float32), held_out_queries(40, 16, 8, seed=9)
    truth, kth = exact_top_k(vectors, queries, K)
    rows = ivf_rows("IVF16,PQ8x4fs", faiss.METRIC_L2, vectors, stored, queries, truth, kth, str(tmp_path))
    assert len(rows) == len(NPROBE) * len(RERANK) and not list(tmp_path.iterdir())
    assert all(0 <= r["recall"] <= 1 and r["p50_ms"] > 0 for r in rows)
    assert rows[-1]["setting"] == f"nprobe={NPROBE[-1]} rf={RERANK[-1]}" and rows[-1]["recall"] >= 0.99
    best = fastest(rows + [{"index": "never", "setting": "x", "p50_ms": 1.0, "recall": 0.5}])
    assert best["never"] == {"0.95": None, "0.98": None}
    reached = [r for r in rows if r["recall"] >= 0.95]
    assert best[rows[0]["index"]]["0.95"]["p50_ms"] == min(r["p50_ms"] for r in reached)
