"""Outside readers of a store: xarray, tensorstore and plain zarr-python see what StoreReader sees.

Real stores on disk written by the public writer, opened by real xarray (``open_datatree``) and
real tensorstore (its ``zarr3`` driver). Every store here also holds rows past ``committed``, as
a build that was killed (or is still running) leaves them: outside readers must slice to
``committed`` (root attribute ``hoverlay.committed``), and what they get then is the reader's.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr

from hoverlay.stores import CorruptStoreError, LayerGeometry, StoreError, create_store, open_store
from hoverlay.stores.format import (
    ENDS_SUFFIX,
    PIXELS,
    TABLE,
    TABLE_COLUMNS,
    UTF8_SUFFIX,
    layer_path,
)
from hoverlay.stores.groups import GroupsWriter, read_groups
from hoverlay.stores.table import (
    create_string_column,
    is_string_companion,
    read_string_column,
    reserve_string_column,
    string_column_paths,
    write_string_column,
)
from hoverlay.stores.writer import StoreWriter

xr = pytest.importorskip("xarray")
ts = pytest.importorskip("tensorstore")

LAYERS = {"fine": LayerGeometry(6, 5, 8), "coarse": LayerGeometry(2, 3, 16)}
SIZE = 16
COMMITTED = 7
TAIL = 3  # rows written past committed: a build killed before its commit
SOURCES = ["café/猫.png", "", "s3://b/ünïcödé/🐈.jpg", "plain.png", "a\x00b", "tab\there", "e\u0301.png",
           "x" * 300, "new/1.png", "new/2.png"]
STRING_COLUMNS = [c for c, kind in TABLE_COLUMNS.items() if kind == "str"]


def _acts(rng, n):
    return {k: (rng.standard_normal((n, g.height, g.width, g.dim)) + 0.5).astype(np.float32) * 3
            for k, g in LAYERS.items()}


def _rows(lo, hi):
    rows = []
    for i in range(lo, hi):
        row = {"source": SOURCES[i], "label": ["chat", "猫", "dog"][i % 3], "hash": f"sha256:{i:04x}",
               "base_id": -1 if i < 4 else i - 4, "transform": "none" if i < 4 else "rotate",
               "param": 0.0 if i < 4 else 15.0 * i}
        if i == 2:
            row.update(status="failed", reason="truncated file: 'ünïcödé' ends early")
        rows.append(row)
    return rows


def _store(path, chunk=4):
    """COMMITTED committed images (one failed) and TAIL written, uncommitted ones after them."""
    rng = np.random.default_rng(5)
    w = create_store(path, model={"spec": "test"}, preprocessing={"kind": "none"}, image_size=SIZE,
                     layers=LAYERS, chunk=chunk)
    start = w.reserve(COMMITTED)
    acts = _acts(rng, COMMITTED)
    for g in acts.values():
        g[2] = 0  # the failed image: zero vectors, as the build writes them
    pixels = rng.integers(0, 255, (COMMITTED, SIZE, SIZE, 3), dtype=np.uint8)
    w.write_block(start, pixels[:4], {k: v[:4] for k, v in acts.items()})
    w.write_block(start + 4, pixels[4:], {k: v[4:] for k, v in acts.items()})
    w.write_table(start, _rows(0, 4))
    w.write_table(start + 4, _rows(4, COMMITTED))
    w.commit(COMMITTED)
    start = w.reserve(TAIL)  # ... and a build that dies after writing, before its commit
    w.write_block(start, rng.integers(0, 255, (TAIL, SIZE, SIZE, 3), dtype=np.uint8), _acts(rng, TAIL))
    w.write_table(start, _rows(COMMITTED, COMMITTED + TAIL))
    return w


def _open_datatree(path):
    with warnings.catch_warnings():
        # no consolidated metadata; index/ and the lock file are not Zarr nodes
        warnings.simplefilter("ignore")
        return xr.open_datatree(str(path), engine="zarr")


def _ts(path, array):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{array}"}}
    return ts.open(spec, read=True).result()


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _all_arrays(group, prefix=""):
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            yield prefix + name, node
        else:
            yield from _all_arrays(node, prefix + name + "/")


# ============================================================================ dimension names
def test_every_array_has_dimension_names(tmp_path):
    w = _store(tmp_path / "s")
    gw = GroupsWriter(w.group, "fine", COMMITTED, 6, 5, k=3, chunk=4)
    expected = {
        PIXELS: ("image", "y", "x", "rgb"),
        **{layer_path(n, "vectors"): ("image", "y", "x", "channel") for n in LAYERS},
        **{layer_path(n, "norms"): ("image", "y", "x") for n in LAYERS},
        **{f"{TABLE}/{c}": ("image",) for c in TABLE_COLUMNS},
        **{f"{TABLE}/{c}{ENDS_SUFFIX}": ("image",) for c in STRING_COLUMNS},
        **{f"{TABLE}/{c}{UTF8_SUFFIX}": (f"{c}.byte",) for c in STRING_COLUMNS},
        gw.groups.path: ("factorized_image", "y", "x"),
        gw.weights.path: ("factorized_image", "y", "x", "group"),
    }
    found = {path: node.metadata.dimension_names for path, node in _all_arrays(zarr.open_group(tmp_path / "s"))}
    assert found == expected
    for path in expected:  # in the zarr.json every other Zarr v3 reader parses
        with open(tmp_path / "s" / path / "zarr.json") as f:
            assert tuple(json.load(f)["dimension_names"]) == expected[path]


# ================================================================================== xarray
def test_xarray_opens_layers_and_table_as_labelled_variables_equal_to_the_reader(tmp_path):
    _store(tmp_path / "s")
    reader = open_store(tmp_path / "s")
    tree = _open_datatree(tmp_path / "s")
    committed = tree.attrs["hoverlay"]["committed"]
    assert committed == reader.n_images == COMMITTED

    images = tree["images"].to_dataset()
    assert images["pixels"].dims == ("image", "y", "x", "rgb")
    assert images.sizes["image"] == COMMITTED + TAIL  # the arrays hold the uncommitted rows too
    assert images["pixels"].isel(image=slice(committed, None)).values.any()  # data, not fill
    assert _same_bits(images["pixels"].isel(image=slice(0, committed)).values, reader.pixels(slice(None)))

    for name, g in LAYERS.items():
        layer = tree[f"layers/{name}"].to_dataset().isel(image=slice(0, committed))
        assert dict(layer.sizes) == {"image": COMMITTED, "y": g.height, "x": g.width, "channel": g.dim}
        assert layer["vectors"].dims == ("image", "y", "x", "channel")
        assert layer["norms"].dims == ("image", "y", "x")
        assert _same_bits(layer["vectors"].values, reader.vectors(name, slice(None)))
        assert _same_bits(layer["norms"].values, reader.norms(name, slice(None)))
        # a labelled selection is the reader's patch
        v = layer["vectors"].sel(image=5, y=g.height - 1, x=1).values
        assert _same_bits(v, reader.vectors(name, 5)[g.height - 1, 1])

    table = tree["images/table"].to_dataset().isel(image=slice(0, committed))
    ours = reader.table()
    for column in TABLE_COLUMNS:
        var = table[column]
        assert var.dims == ("image",)
        if TABLE_COLUMNS[column] == "str":
            assert [str(x) for x in var.values] == list(ours[column]), column  # strings, not bytes
        else:
            assert _same_bits(var.values, ours[column]), column
    assert list(ours["source"]) == SOURCES[:COMMITTED]
    assert ours["reason"][2] == "truncated file: 'ünïcödé' ends early" and list(ours["status"]).count("ok") == 6
    # without slicing, an outside reader would see the killed build's rows as images
    assert [str(x) for x in tree["images/table"]["source"].values] == SOURCES


def test_xarray_sees_factorised_groups_beside_more_images(tmp_path):
    w = _store(tmp_path / "s")
    rng = np.random.default_rng(1)
    gw = GroupsWriter(w.group, "fine", 4, 6, 5, k=3, chunk=4)  # factorised when 4 images existed
    groups = rng.integers(-1, 3, (4, 6, 5)).astype(np.int16)
    gw.write(0, groups, rng.random((4, 6, 5, 3)).astype(np.float16))
    gw.finish({"k": 3, "components": rng.random((3, 8)).tolist(), "method": "nmf", "negative": "clip",
               "images": "all", "images_factorized": 4, "reconstruction_error": 0.1})
    reader = open_store(tmp_path / "s")
    layer = _open_datatree(tmp_path / "s")["layers/fine"].to_dataset()
    assert layer.sizes["factorized_image"] == 4 and layer.sizes["image"] == COMMITTED + TAIL
    assert _same_bits(layer["groups"].values, read_groups(reader, "fine", [0, 1, 2, 3])[0])


# ============================================================================== tensorstore
def test_tensorstore_reads_vectors_bit_identically_and_strings_equal_to_the_reader(tmp_path):
    path = tmp_path / "s"
    _store(path)
    reader = open_store(path)
    n = reader.n_images
    for name in LAYERS:
        vectors = _ts(path, layer_path(name, "vectors"))
        assert vectors.domain.labels == ("image", "y", "x", "channel")  # dimension names, as labels
        assert vectors.shape[0] == COMMITTED + TAIL
        assert _same_bits(vectors[:n].read().result(), reader.vectors(name, slice(None)))
        assert _same_bits(_ts(path, layer_path(name, "norms"))[:n].read().result(),
                          reader.norms(name, slice(None)))
    assert _same_bits(_ts(path, PIXELS)[:n].read().result(), reader.pixels(slice(None)))

    table = reader.table()
    for column in STRING_COLUMNS:
        # zarr-python's `string` data type is not one tensorstore reads; its companions are
        ends = _ts(path, f"{TABLE}/{column}{ENDS_SUFFIX}")[:n].read().result()
        utf8 = _ts(path, f"{TABLE}/{column}{UTF8_SUFFIX}").read().result()
        assert ends.dtype == np.int64 and utf8.dtype == np.uint8
        starts = np.concatenate([[0], ends[:-1]])  # every row is written: row i starts at ends[i-1]
        decoded = [bytes(utf8[a:b]).decode("utf-8") for a, b in zip(starts, ends, strict=True)]
        assert decoded == list(table[column]), column
    for column in ("base_id", "param"):
        assert _same_bits(_ts(path, f"{TABLE}/{column}")[:n].read().result(), table[column])


# ============================================================================= string columns
def test_string_columns_round_trip_any_text_in_both_forms(tmp_path):
    g = zarr.open_group(tmp_path / "c.zarr", mode="w", zarr_format=3)
    values = SOURCES + ["", "🐈‍⬛ family", "\x00", "trailing\x00"]
    for version in (1, 2):
        path = f"v{version}/col"
        create_string_column(g, path, format_version=version, fill="?")
        assert {p.rsplit("/", 1)[-1] for p in string_column_paths(path, format_version=version)} == (
            {"col"} if version == 1 else {"col", "col.utf8", "col.ends"})
        reserve_string_column(g, path, 0, 5, format_version=version)
        write_string_column(g, path, 0, values[:2], format_version=version)
        write_string_column(g, path, 2, np.array(values[2:5], dtype=object), format_version=version)
        reserve_string_column(g, path, 5, len(values) - 5, format_version=version)
        write_string_column(g, path, 5, values[5:], format_version=version)
        got = read_string_column(g, path, len(values), format_version=version)
        assert got.dtype == object and list(got) == values
        assert all(type(v) is str for v in got)
        assert list(read_string_column(g, path, 9, start=3, format_version=version)) == values[3:9]
        assert read_string_column(g, path, 3, start=3, format_version=version).size == 0
        # the `string` array, which xarray and zarr-python read, holds the same values
        assert list(np.asarray(g[path][:]).astype(object)) == values
    assert not any(is_string_companion(n) for n in ("col", "source", "utf8", "ends"))
    assert is_string_companion("col.utf8") and is_string_companion("col.ends")


def test_a_crashed_tail_is_dropped_and_unwritten_rows_read_as_the_fill_value(tmp_path):
    g = zarr.open_group(tmp_path / "c.zarr", mode="w", zarr_format=3)
    create_string_column(g, "c", format_version=2, fill="none")
    reserve_string_column(g, "c", 0, 3, format_version=2)
    write_string_column(g, "c", 0, ["a", "bb", "ccc"], format_version=2)
    reserve_string_column(g, "c", 3, 2, format_version=2)
    write_string_column(g, "c", 3, ["crashed-1", "crashed-2"], format_version=2)  # never committed
    reserve_string_column(g, "c", 3, 4, format_version=2)  # the rerun: bytes after row 2 are gone
    assert g["c.utf8"].shape == (6,) and list(g["c.ends"][3:]) == [-1] * 4
    write_string_column(g, "c", 3, ["dd"], format_version=2)
    # rows 4..6 reserved and never written (committed without table values) read as the fill,
    # as the `string` array reads them
    assert list(read_string_column(g, "c", 7, format_version=2)) == ["a", "bb", "ccc", "dd"] + ["none"] * 3
    assert list(np.asarray(g["c"][:]).astype(object)) == ["a", "bb", "ccc", "dd"] + ["none"] * 3
    reserve_string_column(g, "c", 7, 1, format_version=2)
    write_string_column(g, "c", 7, ["é"], format_version=2)  # after unwritten rows
    assert list(read_string_column(g, "c", 8, start=5, format_version=2)) == ["none", "none", "é"]


def test_string_writes_out_of_order_or_of_non_text_are_refused(tmp_path):
    g = zarr.open_group(tmp_path / "c.zarr", mode="w", zarr_format=3)
    create_string_column(g, "c", format_version=2)
    reserve_string_column(g, "c", 0, 6, format_version=2)
    write_string_column(g, "c", 3, ["later"], format_version=2)
    with pytest.raises(StoreError, match="row 3 is already written"):
        write_string_column(g, "c", 0, ["a", "b", "c"], format_version=2)
    with pytest.raises(StoreError, match="exceed the 6 reserved rows"):
        write_string_column(g, "c", 4, ["a", "b", "c"], format_version=2)
    with pytest.raises(ValueError, match="must be str, got 5"):
        write_string_column(g, "c", 4, ["a", 5], format_version=2)
    with pytest.raises(ValueError, match="not valid unicode"):
        write_string_column(g, "c", 4, ["lone \udc80 surrogate"], format_version=2)
    assert list(read_string_column(g, "c", 6, format_version=2)) == ["", "", "", "later", "", ""]


@pytest.mark.parametrize("damage,says", [
    (lambda g: g["images/table/hash.ends"].__setitem__(3, 2), "hash.ends is damaged at row 3"),
    (lambda g: g["images/table/hash.utf8"].resize((20,)), "hash.ends is damaged at row"),
    (lambda g: g["images/table/hash.utf8"].__setitem__(1, 0xFF), "hash.utf8 is not UTF-8"),
])
def test_damaged_string_columns_are_errors_naming_the_column(tmp_path, damage, says):
    _store(tmp_path / "s")
    damage(zarr.open_group(tmp_path / "s", mode="r+"))
    with pytest.raises(CorruptStoreError, match=says):
        open_store(tmp_path / "s").table()


def test_a_version_2_store_without_a_string_columns_ends_is_damaged(tmp_path):
    _store(tmp_path / "s")
    import shutil

    shutil.rmtree(tmp_path / "s" / "images" / "table" / "label.ends")
    with pytest.raises(CorruptStoreError, match="lacks the array 'images/table/label.ends'"):
        open_store(tmp_path / "s")


# ========================================================================== format version 1
def _version_1_store(path, n):
    """A store as hoverlay 0.x wrote format version 1: `string` columns only, no dimension names."""
    rng = np.random.default_rng(9)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_array(PIXELS, shape=(0, SIZE, SIZE, 3), dtype="uint8", chunks=(1, SIZE, SIZE, 3),
                      shards=(4, SIZE, SIZE, 3), compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0)
    fills = {"source": "", "label": "", "hash": "", "base_id": -1, "transform": "none", "param": 0.0,
             "status": "ok", "reason": ""}
    for col, kind in TABLE_COLUMNS.items():
        root.create_array(f"{TABLE}/{col}", shape=(0,), dtype=str if kind == "str" else kind,
                          chunks=(4096,), fill_value=fills[col])
    for name, g in LAYERS.items():
        blosc = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        root.create_array(layer_path(name, "vectors"), shape=(0, g.height, g.width, g.dim), dtype="float16",
                          chunks=(1, g.height, g.width, g.dim), shards=(4, g.height, g.width, g.dim),
                          compressors=blosc, fill_value=0)
        root.create_array(layer_path(name, "norms"), shape=(0, g.height, g.width), dtype="float32",
                          chunks=(4, g.height, g.width), compressors=blosc, fill_value=0)
    for _, arr in _all_arrays(root):
        arr.resize((n, *arr.shape[1:]))
    pixels = rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8)
    root[PIXELS][:] = pixels
    vectors = {}
    for name, g in LAYERS.items():
        vectors[name] = rng.random((n, g.height, g.width, g.dim)).astype(np.float16) + np.float16(0.1)
        root[layer_path(name, "vectors")][:] = vectors[name]
        root[layer_path(name, "norms")][:] = rng.random((n, g.height, g.width)).astype(np.float32) + 1
    rows = _rows(0, n)
    for col, kind in TABLE_COLUMNS.items():
        values = [r.get(col, fills[col]) for r in rows]
        root[f"{TABLE}/{col}"][:] = np.array(values, dtype=object) if kind == "str" else np.array(values, kind)
    root.attrs["hoverlay"] = {
        "format": "hoverlay", "format_version": 1, "tool_version": "0.9", "model": {"spec": "test"},
        "preprocessing": {"kind": "none"}, "image_size": SIZE,
        "layers": {k: g.as_dict() for k, g in LAYERS.items()}, "chunk": 4, "committed": n,
        "created": "2026-01-01T00:00:00.000000+00:00", "updated": "2026-01-01T00:00:00+00:00", "extra": {}}
    return pixels, vectors, rows


def test_a_version_1_store_still_opens_reads_the_same_and_stays_version_1(tmp_path):
    path = tmp_path / "v1"
    pixels, vectors, rows = _version_1_store(path, 5)
    reader = open_store(path)
    assert reader.attrs.format_version == 1 and reader.n_images == 5
    assert _same_bits(reader.pixels(slice(None)), pixels)
    for name in LAYERS:
        assert _same_bits(reader.vectors(name, slice(None)), vectors[name])
    table = reader.table()
    for col in STRING_COLUMNS:
        assert list(table[col]) == [r.get(col, "ok" if col == "status" else "") for r in rows], col
    assert list(table["source"]) == SOURCES[:5] and table["reason"][2].startswith("truncated")

    w = StoreWriter.open(path)  # an append keeps the store's own version and form
    start = w.reserve(2)
    w.write_block(start, np.zeros((2, SIZE, SIZE, 3), np.uint8), _acts(np.random.default_rng(2), 2))
    w.write_table(start, [{"source": "new/é.png", "hash": "n1"}, {"source": "new/2.png", "hash": "n2"}])
    w.commit(start + 2)
    reader = open_store(path)
    assert reader.attrs.format_version == 1 and reader.n_images == 7
    assert list(reader.table()["source"]) == SOURCES[:5] + ["new/é.png", "new/2.png"]
    names = {name for name, _ in zarr.open_group(path)[TABLE].members()}
    assert names == set(TABLE_COLUMNS)  # no companions appeared
