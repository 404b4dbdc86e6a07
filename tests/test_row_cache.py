"""The reader's row cache: the same rows as a read without it, decoded once, never a damaged row."""

import json
import os

import numpy as np
import pytest

from hoverlay.stores import CorruptStoreError, LayerGeometry, open_store
from hoverlay.stores.row_cache import RowCache
from hoverlay.stores.synthetic import make_synthetic_store

LAYERS = {"a": LayerGeometry(3, 3, 8), "b": LayerGeometry(2, 2, 16)}


def test_the_cache_keeps_copies_read_only_and_drops_the_least_recently_used_beyond_its_bytes():
    rows = RowCache(max_bytes=3 * 80)
    big = np.arange(80, dtype=np.float16).reshape(2, 40)  # rows of 80 bytes
    kept = rows.put("v", 0, big[0])  # a row of a larger read: kept apart from it
    assert not np.shares_memory(kept, big) and not kept.flags.writeable
    with pytest.raises(ValueError):
        kept[0] = 1
    rows.put("v", 1, np.ones(40, np.float16))
    rows.put("v", 2, np.ones(40, np.float16))
    assert rows.get("v", 0) is not None  # 0 is now the most recently used
    rows.put("v", 3, np.ones(40, np.float16))  # 4 x 80 bytes > 240: the least recently used (1) goes
    assert rows.get("v", 1) is None and rows.get("v", 0) is not None and rows.get("v", 3) is not None
    assert rows.nbytes == 3 * 80 and len(rows) == 3
    rows.put("v", 9, np.ones(400, np.float16))  # larger than the whole cache: returned, not kept
    assert rows.get("v", 9) is None and rows.nbytes == 3 * 80
    rows.clear()
    assert len(rows) == 0 and rows.nbytes == 0


@pytest.fixture()
def store(tmp_path) -> str:
    url = str(tmp_path / "s")
    make_synthetic_store(url, 12, layers=LAYERS, image_size=8, chunk=4)
    return url


@pytest.mark.parametrize("selection", [5, np.int64(5), [5], np.array([7, 2, 2, 9]), np.array([[1, 2], [3, 4]]),
                                       np.array([], dtype=np.int64), slice(2, 9)])
def test_reads_through_the_cache_equal_reads_without_it_also_when_repeated(store, selection):
    plain, cached = open_store(store), open_store(store, row_cache_bytes=1 << 20)
    for _ in range(2):  # decoded, then from the cache
        for layer in LAYERS:
            np.testing.assert_array_equal(cached.vectors(layer, selection), plain.vectors(layer, selection))
            np.testing.assert_array_equal(cached.norms(layer, selection), plain.norms(layer, selection))
            assert cached.vectors(layer, selection).dtype == np.float16
        np.testing.assert_array_equal(cached.pixels(selection), plain.pixels(selection))
    ids = np.arange(12)[selection].reshape(-1) if not isinstance(selection, int | np.integer) else [selection]
    if isinstance(selection, slice):
        assert len(cached.rows) == 0  # a slice is a bulk read: it never fills the cache
    else:
        assert len(cached.rows) == len(set(np.asarray(ids).tolist())) * (2 * len(LAYERS) + 1)
        assert cached.rows.hits > 0 or len(ids) == 0


def test_a_row_is_decoded_once_and_a_selection_too_large_for_the_cache_bypasses_it(store):
    reader = open_store(store, row_cache_bytes=4 * 3 * 3 * 8 * 2 * 4)  # room for 16 rows of layer a
    reader.vectors("a", 3)
    misses = reader.rows.misses
    for _ in range(5):
        reader.vectors("a", 3)
        reader.vectors("a", np.array([3, 3]))
    assert reader.rows.misses == misses and reader.rows.hits == 10
    reader.vectors("a", np.arange(12))  # 12 rows > a quarter of the cache: read around it
    assert len(reader.rows) == 1


def test_a_missing_shard_raises_through_the_cache_and_is_never_cached(store):
    reader = open_store(store, row_cache_bytes=1 << 20)
    shard = os.path.join(store, "layers", "a", "vectors", "c", "1", "0", "0", "0")  # images 4..7
    os.remove(shard)
    for selection in (5, np.array([1, 5]), np.array([5])):
        with pytest.raises(CorruptStoreError, match=r"image\(s\) 5 are missing"):
            reader.vectors("a", selection)
    assert ("layers/a/vectors", 5) not in {key for key in reader.rows._rows}
    np.testing.assert_array_equal(reader.vectors("a", 1), open_store(store).vectors("a", 1))  # others still read


def test_a_refresh_that_sees_a_new_commit_drops_the_cached_rows(store):
    reader = open_store(store, row_cache_bytes=1 << 20)
    reader.vectors("a", 2)
    assert len(reader.rows) == 1
    assert not reader.refresh() and len(reader.rows) == 1  # nothing new: kept
    path = os.path.join(store, "zarr.json")  # a commit of the same count (a retried image): a new stamp
    doc = json.loads(open(path).read())
    doc["attributes"]["hoverlay"]["updated"] = "2100-01-01T00:00:00+00:00"
    open(path, "w").write(json.dumps(doc))
    assert reader.refresh() and len(reader.rows) == 0
