"""index/<layer>.json has a schema (stores.index_meta.IndexMeta), validated where it is read."""

import json
import math
import os

import pytest

from hoverlay.stores import IndexMeta, LayerGeometry, PatchIndex, open_store
from hoverlay.stores.errors import FormatVersionError, StoreError
from hoverlay.stores.index import read_index_meta
from hoverlay.stores.index_meta import RecallRecord, RerankRecord
from hoverlay.stores.synthetic import make_synthetic_store


def test_round_trip_and_files_written_before_the_schema():
    meta = IndexMeta(factory="IVF16,SQ8", dim=32, params={"nprobe": 4}, images_indexed=10, ntotal=160,
                     recall=RecallRecord(k=10, value=0.97, queries=20, exact_index=False, p50_ms=0.4),
                     rerank=RerankRecord(rows=160, file="l.f16"))
    data = json.loads(json.dumps(meta.to_json()))
    assert IndexMeta.from_json(data, "x") == meta and meta.rerank_rows == 160
    del data["schema_version"]  # as every index.json written before the schema existed
    assert IndexMeta.from_json(data, "x") == meta
    assert math.isnan(IndexMeta.from_json({"factory": "IDMap,Flat", "dim": 8, "recall": {
        "k": 10, "value": float("nan"), "queries": 0, "exact_index": True}}, "x").recall.value)


@pytest.mark.parametrize("change,message", [
    ({"dim": "32"}, "field 'dim' = '32' is not int"),
    ({"recall": {"k": 10}}, "field 'recall.value' is missing"),
    ({"rerank": {"rows": 1, "colour": "red"}}, "unknown field 'rerank.colour'"),
    ({"images_indexed": None}, "field 'images_indexed' = None is not int"),
    ({"factory": None}, "field 'factory' = None"),
])
def test_bad_fields_are_errors_naming_the_file_and_field(change, message):
    data = {"factory": "IDMap,Flat", "dim": 32, **change}
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        IndexMeta.from_json(data, "store/index/l.json")
    assert "store/index/l.json" in str(err.value)
    with pytest.raises(FormatVersionError, match="schema_version 3"):
        IndexMeta.from_json({"factory": "IDMap,Flat", "dim": 32, "schema_version": 3}, "x")


def test_a_damaged_index_json_is_an_error_and_search_falls_back(tmp_path):
    from hoverlay.pipeline.indexing import update_index
    from hoverlay.stores.search import LayerSearch

    make_synthetic_store(tmp_path / "s", 40, layers={"l": LayerGeometry(4, 4, 16)}, image_size=8, chunk=8)
    reader = open_store(tmp_path / "s")
    written = update_index(reader, "l", n_queries=10).meta
    assert read_index_meta(reader.url, "l") == written == PatchIndex.load(reader.url, "l").meta
    path = os.path.join(reader.url, "index", "l.json")
    data = json.loads(open(path).read())
    data["images_indexed"] = "forty"
    open(path, "w").write(json.dumps(data))
    with pytest.raises(StoreError, match="images_indexed"):
        read_index_meta(reader.url, "l")
    search = LayerSearch(reader, "l")
    assert search.index is None and "unusable" in search.warning
    open(path, "w").write("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        read_index_meta(reader.url, "l")
    assert update_index(reader, "l", n_queries=10).meta.images_indexed == 40  # a rerun rebuilds it


def test_index_and_rerank_files_get_the_same_mode_as_the_zarr_files(tmp_path):
    """Files renamed into the store follow the umask like Zarr's chunks (mkstemp alone gives 0600,
    which a server running as another user cannot read)."""
    from hoverlay.pipeline.indexing import update_index
    from hoverlay.stores.localfiles import umask

    make_synthetic_store(tmp_path / "s", 80, layers={"l": LayerGeometry(4, 4, 16)}, image_size=8, chunk=8)
    reader = open_store(tmp_path / "s")
    update_index(reader, "l", factory="IVF4,SQ8", n_queries=10)
    chunk = next(p for p in (tmp_path / "s" / "layers").rglob("*") if p.is_file() and "/c/" in str(p))
    want = 0o666 & ~umask()
    assert chunk.stat().st_mode & 0o777 == want
    for ext in (".faiss", ".json", ".f16"):
        assert (tmp_path / "s" / "index" / f"l{ext}").stat().st_mode & 0o777 == want, ext


#: index/l.json exactly as hoverlay wrote it before metadata version 2 (an IVF index with a
#: re-rank file, tuned nprobe): no "choice", no "tuned.ef_search".
V1_JSON = {
    "build_phases": {"pass_s": 0.5, "sample_s": 0.1, "train_s": 0.2, "tune_s": 0.3}, "build_seconds": 1.2,
    "built": "2025-01-01T00:00:00Z", "dim": 32, "factory": "IVF16,SQ8", "images_indexed": 300,
    "kmeans": None, "memory_budget": 1000000000, "metric": "inner_product", "nlist": 16, "ntotal": 4800,
    "params": {"nprobe": 5}, "schema_version": 1,
    "recall": {"exact_index": False, "k": 10, "measured": "index search + exact re-rank vs exact scan",
               "p50_ms": 0.3, "queries": 30, "value": 0.97},
    "rerank": {"dtype": "float16", "file": "l.f16", "rows": 4800, "store_created": "x"},
    "rerank_factor": None, "train_points": 1024, "trained_on": "cpu",
    "tuned": {"lower_bound": 0.955, "nprobe": 5, "recall": 0.97, "rerank_factor": 4, "rule": "r",
              "target_recall": 0.95},
}


def test_version_1_metadata_still_opens_searches_and_is_extended(tmp_path):
    """An index built before metadata version 2 loads (fields absent: no choice, no ef_search),
    searches with its saved nprobe, and an update extends it, writing version 2."""
    import faiss
    import numpy as np

    from hoverlay.pipeline.indexing import update_index
    from hoverlay.stores.index_meta import INDEX_META_VERSION
    from hoverlay.stores.search import LayerSearch
    from hoverlay.stores.synthetic import append_synthetic_images

    make_synthetic_store(tmp_path / "s", 300, layers={"l": LayerGeometry(4, 4, 32)}, image_size=8, chunk=16)
    reader = open_store(tmp_path / "s")
    update_index(reader, "l", factory="IVF16,SQ8", n_queries=10)  # today's files ...
    path = tmp_path / "s" / "index" / "l.json"
    old = dict(V1_JSON, rerank={**V1_JSON["rerank"], "store_created": reader.attrs.created})
    path.write_text(json.dumps({k: v for k, v in old.items() if v is not None}))  # ... with a v1 json
    meta = read_index_meta(reader.url, "l")
    assert meta.schema_version == 1 and meta.choice is None and meta.tuned.ef_search is None
    index = PatchIndex.load(reader.url, "l")
    assert faiss.extract_index_ivf(index.index).nprobe == 5
    search = LayerSearch(reader, "l")
    assert search.warning is None
    q = search.query_vector(7, 1, 2).astype(np.float32)
    assert search.search(q, 5).ids[0] == reader.patch_id("l", 7, 1, 2)
    append_synthetic_images(tmp_path / "s", 10, seed=4)
    reader.refresh()
    update = update_index(reader, "l", n_queries=10)
    assert update.added == 160 and update.meta.factory == "IVF16,SQ8"  # extended, not rebuilt
    assert update.meta.rerank.rows == 310 * 16  # the v1 re-rank file was appended to
    written = json.loads(path.read_text())
    assert written["schema_version"] == INDEX_META_VERSION == 2


def test_version_2_records_the_choice_and_round_trips():
    from hoverlay.stores.index_meta import ChoiceRecord, TuneRecord

    meta = IndexMeta(factory="IDMap,HNSW32_SQfp16", dim=112, params={"efSearch": 24},
                     tuned=TuneRecord(nprobe=None, rerank_factor=4, recall=0.97, lower_bound=0.955,
                                      target_recall=0.95, ef_search=24),
                     choice=ChoiceRecord(factory="IDMap,HNSW32_SQfp16", reason="graph", index_bytes=10,
                                         rerank_bytes=0, budget=100, rerank_file=False, ef_construction=80))
    data = json.loads(json.dumps(meta.to_json()))
    assert data["schema_version"] == 2 and data["choice"]["rerank_file"] is False
    assert IndexMeta.from_json(data, "x") == meta
