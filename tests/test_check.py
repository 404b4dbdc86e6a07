"""``hoverlay check [--repair]``: every chunk and index read, damage reported, indexes rebuilt."""

from __future__ import annotations

import os

import pytest

from hoverlay.cli import main
from hoverlay.errors import EXIT_INPUT, EXIT_OK
from hoverlay.pipeline.indexing import update_index
from hoverlay.stores import LayerGeometry, open_store
from hoverlay.stores.check import check_store
from hoverlay.stores.index import index_path
from hoverlay.stores.synthetic import append_synthetic_images, make_synthetic_store

LAYERS = {"a": LayerGeometry(3, 3, 8), "b": LayerGeometry(2, 2, 16)}


@pytest.fixture
def store(tmp_path):
    url = str(tmp_path / "s")
    make_synthetic_store(url, 12, layers=LAYERS, image_size=16, chunk=4)
    reader = open_store(url)
    for layer in LAYERS:
        update_index(reader, layer)
    return url


def _files(url, layer):
    base = index_path(url, layer)
    return base + ".faiss", base + ".json"


def test_a_sound_store_has_no_findings(store, capsys):
    report = check_store(store)
    assert report.ok and report.images == 12
    assert main(["check", store]) == EXIT_OK
    out = capsys.readouterr().out
    assert "no problems found" in out and "vectors and norms of a, b" in out


def test_missing_stale_and_unreadable_indexes_are_found_and_repaired(store, capsys):
    faiss_a, json_a = _files(store, "a")
    os.remove(json_a)                                  # a: missing
    append_synthetic_images(store, 4, seed=3)           # a and b: stale (cover 12 of 16)
    stale = [f for f in check_store(store).findings if f.where == "index b"]
    assert [f.problem for f in stale] == ["stale: covers 12 of 16 committed images"]
    faiss_b, _ = _files(store, "b")
    with open(faiss_b, "r+b") as f:                    # b: truncated .faiss
        f.truncate(40)
    report = check_store(store)
    found = {(f.where, f.problem.split(":")[0].split(" (")[0]) for f in report.findings}
    assert report.unindexed == ["a"]  # no index is no damage (build --no-index), but repairable
    assert ("index b", "the .faiss file does not load") in found
    assert all(f.repairable for f in report.findings)
    assert main(["check", store]) == EXIT_INPUT
    assert "repairable with --repair" in capsys.readouterr().out
    assert main(["check", store, "--repair"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "repaired: rebuilt the index of a" in out and "repaired: rebuilt the index of b" in out
    assert "no index for a" not in out.split("repaired")[-1]
    assert out.strip().endswith("no problems found")
    assert check_store(store).ok


def test_damaged_data_names_images_and_files_and_is_not_repaired(store, capsys):
    reader = open_store(store)
    before = reader.vectors("b", slice(0, 4)).copy()
    shard = os.path.join(store, "layers", "a", "vectors", "c", "1", "0", "0", "0")  # images 4..7
    os.remove(shard)
    pixels = os.path.join(store, "images", "pixels", "c", "2", "0", "0", "0")        # images 8..11
    with open(pixels, "r+b") as f:
        f.truncate(10)
    report = check_store(store)
    where = {f.where: f for f in report.findings}
    assert set(where) == {"layers/a/vectors", "images/pixels"} and not report.ok
    assert "4, 5, 6, 7" in where["layers/a/vectors"].problem and shard in where["layers/a/vectors"].problem
    assert "images/pixels of image(s) 8" in where["images/pixels"].problem
    assert not any(f.repairable for f in report.findings)
    assert main(["check", store, "--repair"]) == EXIT_INPUT  # nothing to rebuild: data is data
    out = capsys.readouterr().out
    assert "restore the file or rebuild the store" in out and "repaired" not in out
    assert (open_store(store).vectors("b", slice(0, 4)) == before).all()  # untouched


def test_info_warns_of_missing_shard_files_without_reading_chunks(store, capsys):
    from hoverlay.stores.info import missing_shards

    assert missing_shards(open_store(store)) == {}
    os.remove(os.path.join(store, "layers", "b", "norms", "c", "2", "0", "0"))  # images 8..11
    assert missing_shards(open_store(store)) == {"layers/b/norms": [2]}
    assert main(["info", store]) == EXIT_OK
    assert "DAMAGED    layers/b/norms: shard file(s) 2 missing (run `hoverlay check`)" in capsys.readouterr().out


def test_a_store_built_without_indexes_is_sound(tmp_path, capsys):
    url = str(tmp_path / "plain")
    make_synthetic_store(url, 4, layers=LAYERS, image_size=16, chunk=4)
    assert main(["check", url]) == EXIT_OK
    out = capsys.readouterr().out
    assert "no index for a, b (top-k scans exactly; --repair builds one)" in out and "no problems found" in out
