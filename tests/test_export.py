"""Exports (issue #14 part 4): hits tables, patch vectors, the explorer's top-k CSV, FiftyOne.

Real stores on disk (synthetic vectors written through the public writer, a FAISS IVF index
built by the pipeline's indexing), real pyarrow and the real CLI; FiftyOne and autofaiss only
where they are installed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import modules_after

from hoverlay.cli import main
from hoverlay.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE
from hoverlay.stores import LayerGeometry, StoreWriter, open_store
from hoverlay.stores.export_options import EXPORTS
from hoverlay.stores.exports import (
    HIT_COLUMNS,
    ID_COLUMNS,
    QUERY_COLUMNS,
    HitQuery,
    csv_cell,
    csv_uncell,
    export_hits,
    export_vectors,
    read_hits,
    read_queries_csv,
)
from hoverlay.stores.search import LayerSearch
from hoverlay.stores.synthetic import make_synthetic_store
from hoverlay.stores.table import ImageTable
from hoverlay.stores.to_fiftyone import oriented_size, source_box

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"fine": LayerGeometry(8, 8, 16), "coarse": LayerGeometry(4, 4, 32)}
N_OK = 40
FAILED = 40  # image id of the one failed image (zeros, status failed)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """42 images: 40 synthetic, one failed, one more ok; an IVF,SQ8 index on "fine" (searched
    through FAISS + exact re-rank), none on "coarse" (an exact scan)."""
    from hoverlay.pipeline.indexing import update_index

    url = str(tmp_path_factory.mktemp("export") / "store")
    make_synthetic_store(url, N_OK, layers=LAYERS, image_size=32, chunk=8, labels=("=cmd", "+x", "plain"))
    w = StoreWriter.open(url)
    start = w.reserve(2)
    rng = np.random.default_rng(5)
    acts = {n: np.abs(rng.standard_normal((2, g.height, g.width, g.dim))).astype(np.float32)
            for n, g in LAYERS.items()}
    for a in acts.values():
        a[0] = 0  # the failed image has no activations
    w.write_block(start, np.zeros((2, 32, 32, 3), np.uint8), acts)
    w.write_table(start, [{"source": "/gone/broken.png", "label": "plain", "hash": "h-failed",
                           "status": "failed", "reason": "truncated"},
                          {"source": "/x/last.png", "label": "-minus", "hash": "h-last"}])
    w.commit(start + 2)
    update_index(open_store(url), "fine", factory="IVF8,SQ8", n_queries=20)
    return url


def _search(store: str, layer: str, image: int, y: int, x: int, k: int):
    reader = open_store(store)
    search = LayerSearch(reader, layer)
    return search, search.search(search.query_vector(image, y, x), k)


def _read_parquet(path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ====================================================================================== hits
def test_hits_of_one_query_round_trip_as_parquet_and_csv_and_equal_layer_search(store, tmp_path):
    search, top = _search(store, "fine", 3, 2, 5, 10)
    assert search.index is not None  # through FAISS + exact re-rank, as the explorer's panel
    done = export_hits(store, tmp_path / "h.parquet", [(3, 2, 5)], layer="fine", k=10)
    assert done.rows == 10 and done.queries == 1 and done.format == "parquet"
    cols = _read_parquet(tmp_path / "h.parquet")
    assert list(cols) == [*QUERY_COLUMNS, *HIT_COLUMNS]
    assert (cols["image"][0], cols["y"][0], cols["x"][0]) == (3, 2, 5)  # the query itself first
    assert cols["score"][0] == pytest.approx(1.0, abs=2e-3)
    assert cols["score"] == sorted(cols["score"], reverse=True)
    assert cols["patch_id"] == top.ids.tolist()
    np.testing.assert_array_equal(np.float32(cols["score"]), top.scores)
    assert cols["rank"] == list(range(1, 11)) and set(cols["query"]) == {0}
    assert set(cols["layer"]) == {"fine"} and (cols["query_image"][0], cols["query_y"][0]) == (3, 2)
    reader = open_store(store)
    table = reader.table()
    assert cols["source"] == [table["source"][i] for i in cols["image"]]
    assert cols["label"] == [table["label"][i] for i in cols["image"]]
    image, y, x = reader.patch_coords("fine", top.ids)
    assert (cols["image"], cols["y"], cols["x"]) == (image.tolist(), y.tolist(), x.tolist())
    assert FAILED not in cols["image"]

    export_hits(store, tmp_path / "h.csv", [(3, 2, 5)], layer="fine", k=10)
    text = (tmp_path / "h.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["patch_id"]) for r in rows] == cols["patch_id"]
    assert [float(r["score"]) for r in rows] == cols["score"]  # full precision, not rounded
    # labels "=cmd" / "+x" would run as formulas in a spreadsheet: written with a quote first
    labels = {r["label"] for r in rows}
    assert labels <= {"'=cmd", "'+x", "plain"} and labels & {"'=cmd", "'+x"}
    assert read_hits(tmp_path / "h.csv")["label"] == cols["label"]  # read back unescaped


def test_several_queries_from_a_csv_with_a_layer_column(store, tmp_path):
    queries = tmp_path / "q.csv"
    queries.write_text("image,y,x,layer,note\n3,2,5,,first\n7, 0 ,1,coarse,second\n\n41,7,7,fine,\"x,y\"\n")
    assert [(q.image, q.y, q.x, q.layer) for q in read_queries_csv(queries)] == [
        (3, 2, 5, None), (7, 0, 1, "coarse"), (41, 7, 7, "fine")]
    out = tmp_path / "hits.parquet"
    assert main(["export", "hits", "--store", store, "--layer", "fine", "--queries", str(queries),
                 "-k", "4", "--out", str(out)]) == EXIT_OK
    cols = _read_parquet(out)
    assert cols["query"] == [0] * 4 + [1] * 4 + [2] * 4 and cols["rank"] == [1, 2, 3, 4] * 3
    assert cols["layer"] == ["fine"] * 4 + ["coarse"] * 4 + ["fine"] * 4
    for q, (image, y, x, layer) in enumerate([(3, 2, 5, "fine"), (7, 0, 1, "coarse"), (41, 7, 7, "fine")]):
        rows = slice(4 * q, 4 * q + 4)
        assert (cols["image"][rows][0], cols["y"][rows][0], cols["x"][rows][0]) == (image, y, x)
        assert cols["score"][rows][0] == pytest.approx(1.0, abs=2e-3)
        assert cols["score"][rows] == sorted(cols["score"][rows], reverse=True)
        assert (cols["query_image"][rows][0], cols["query_y"][rows][0], cols["query_x"][rows][0]) == (image, y, x)
        _, top = _search(store, layer, image, y, x, 4)
        assert cols["patch_id"][rows] == top.ids.tolist()  # "coarse": the exact scan


def test_user_metadata_columns_pass_through_and_a_clashing_name_is_prefixed(store, tmp_path):
    reader = open_store(store)
    core = reader.table()
    n = len(core)
    metadata = {"site": np.array([f"=HYPERLINK(\"x{i}\")" if i % 2 else f"site {i}" for i in range(n)], dtype=object),
                "score": np.arange(n, dtype=np.float64) / 10, "year": np.arange(2000, 2000 + n, dtype=np.int64)}
    table = ImageTable(core.columns, metadata=metadata)
    reader.table = lambda: table  # a store whose table has user columns (as `build --metadata` writes)
    export_hits(reader, tmp_path / "m.parquet", [(5, 1, 1)], layer="fine", k=6)
    cols = _read_parquet(tmp_path / "m.parquet")
    assert list(cols) == [*QUERY_COLUMNS, *HIT_COLUMNS, "site", "metadata_score", "year"]
    assert cols["year"] == [2000 + i for i in cols["image"]]
    assert cols["metadata_score"] == [i / 10 for i in cols["image"]]
    assert cols["site"] == [metadata["site"][i] for i in cols["image"]]
    export_hits(reader, tmp_path / "m.csv", [(5, 1, 1)], layer="fine", k=6)
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    for row, image in zip(rows, cols["image"], strict=True):
        expected = metadata["site"][image]
        assert row["site"] == ("'" + expected if expected.startswith("=") else expected)
        assert int(row["year"]) == 2000 + image


def test_metadata_stored_in_a_store_reaches_hits_and_the_vectors_stay_apart(tmp_path):
    url = str(tmp_path / "meta")
    n = 12
    site = [f"@site{i}" if i % 3 == 0 else f"site {i}" for i in range(n)]
    depth = [float(i) * 1.5 if i != 4 else float("nan") for i in range(n)]
    make_synthetic_store(url, n, layers={"fine": LayerGeometry(4, 4, 8)}, image_size=16, chunk=4,
                         metadata={"site": site, "depth": depth})
    assert set(open_store(url).table().metadata) == {"site", "depth"}  # written by the store's writer
    export_hits(url, tmp_path / "h.parquet", [(4, 1, 1)], layer="fine", k=n * 16)
    cols = _read_parquet(tmp_path / "h.parquet")
    assert list(cols)[len(QUERY_COLUMNS) + len(HIT_COLUMNS):] == list(open_store(url).table().metadata)
    assert cols["site"] == [site[i] for i in cols["image"]]
    got = np.array(cols["depth"], dtype=float)
    np.testing.assert_array_equal(got, np.array([depth[i] for i in cols["image"]]))  # NaN where missing
    export_hits(url, tmp_path / "h.csv", [(4, 1, 1)], layer="fine", k=n * 16)
    rows = list(csv.DictReader((tmp_path / "h.csv").open()))
    for row in rows:
        i = int(row["image"])
        assert row["site"] == ("'" + site[i] if site[i].startswith("@") else site[i])
        assert row["depth"] == ("" if i == 4 else str(depth[i]))  # a missing number is an empty cell
    done = export_vectors(url, "fine", tmp_path / "v")
    assert done.vectors == n * 16


def test_csv_cells_are_quoted_and_formulas_escaped():
    buf = io.StringIO()
    from hoverlay.stores.exports import write_csv

    write_csv({"text": ["a,b", 'say "hi"', "line\nbreak", "=1+1", "@SUM(A1)", "-2", "+3", "ok"],
               "n": [-0.5, 1, 2, 3, 4, 5, 6, 7]}, buf)
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert rows[0] == ["text", "n"]
    assert [r[0] for r in rows[1:]] == ["a,b", 'say "hi"', "line\nbreak", "'=1+1", "'@SUM(A1)", "'-2", "'+3", "ok"]
    assert rows[1][1] == "-0.5"  # numbers are never escaped
    assert [csv_uncell(r[0]) for r in rows[1:]][3:7] == ["=1+1", "@SUM(A1)", "-2", "+3"]
    assert csv_cell("'plain") == "'plain" and csv_uncell("'plain") == "'plain"


def _bad_queries(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name,args,code,says", [
    ("unknown layer", ["--layer", "bogus", "--image", "0", "--y", "0", "--x", "0"], EXIT_INPUT,
     "unknown layer 'bogus'"),
    ("image out of range", ["--layer", "fine", "--image", "42", "--y", "0", "--x", "0"], EXIT_INPUT,
     "image 42 is outside [0, 42)"),
    ("y out of range", ["--layer", "fine", "--image", "1", "--y", "8", "--x", "0"], EXIT_INPUT,
     "y 8 is outside [0, 8)"),
    ("x negative", ["--layer", "fine", "--image", "1", "--y", "0", "--x", "-1"], EXIT_USAGE,
     "--x: '-1' is not an integer >= 0"),
    ("not an integer", ["--layer", "fine", "--image", "one", "--y", "0", "--x", "0"], EXIT_USAGE,
     "--image: 'one' is not an integer >= 0"),
    ("a failed image", ["--layer", "fine", "--image", str(FAILED), "--y", "0", "--x", "0"], EXIT_INPUT,
     "image 40 failed to decode (truncated)"),
    ("k zero", ["--layer", "fine", "--image", "1", "--y", "0", "--x", "0", "-k", "0"], EXIT_USAGE,
     "-k: '0' is not a positive integer"),
    ("no query", ["--layer", "fine"], EXIT_USAGE, "give --image, --y and --x"),
    ("half a query", ["--layer", "fine", "--image", "1", "--y", "0"], EXIT_USAGE, "give --image, --y and --x"),
    ("both", ["--layer", "fine", "--image", "1", "--y", "0", "--x", "0", "--queries", "q.csv"], EXIT_USAGE,
     "not both"),
    ("no layer", ["--image", "1", "--y", "0", "--x", "0"], EXIT_USAGE, "missing --layer"),
    ("csv missing a column", ["--layer", "fine", "--queries", "CSV:image,y\n1,2\n"], EXIT_INPUT,
     "has no column x"),
    ("csv not an integer", ["--layer", "fine", "--queries", "CSV:image,y,x\n1,2,3\n1,2.5,3\n"], EXIT_INPUT,
     "line 3: y has '2.5', not an integer"),
    ("csv empty cell", ["--layer", "fine", "--queries", "CSV:image,y,x\n1,,3\n"], EXIT_INPUT,
     "line 2: y has no value"),
    ("csv out of range", ["--layer", "fine", "--queries", "CSV:image,y,x\n1,2,3\n1,2,99\n"], EXIT_INPUT,
     "line 3: x 99 is outside [0, 8)"),
    ("csv unknown layer", ["--queries", "CSV:image,y,x,layer\n1,2,3,fin\n"], EXIT_INPUT,
     "line 2: unknown layer 'fin'"),
    ("csv no rows", ["--layer", "fine", "--queries", "CSV:image,y,x\n"], EXIT_INPUT, "has no queries"),
    ("csv missing", ["--layer", "fine", "--queries", "nowhere.csv"], EXIT_INPUT, "not found"),
    ("unknown extension", ["--layer", "fine", "--image", "1", "--y", "0", "--x", "0", "--out", "OUT/h.xlsx"],
     EXIT_USAGE, "unknown extension .xlsx; use .parquet or .csv"),
    ("no folder", ["--layer", "fine", "--image", "1", "--y", "0", "--x", "0", "--out", "OUT/no/h.csv"],
     EXIT_INPUT, "does not exist"),
])
def test_bad_hits_input_is_one_line_and_writes_nothing(store, tmp_path, capsys, name, args, code, says):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [a.replace("OUT", str(out_dir)) for a in args]
    args = [_bad_queries(tmp_path, a[4:]) if a.startswith("CSV:") else a for a in args]
    args = [str(tmp_path / a) if a.endswith(".csv") and "/" not in a else a for a in args]
    if "--out" not in args:
        args += ["--out", str(out_dir / "hits.parquet")]
    assert main(["export", "hits", "--store", store, *args]) == code
    err = capsys.readouterr().err.strip()
    assert says in err, err
    assert err.startswith("hoverlay export: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert _listing(out_dir) == []  # no output, no temporary file


def test_a_failed_export_leaves_an_existing_file_as_it_was(store, tmp_path):
    out = tmp_path / "h.csv"
    out.write_text("old")
    assert main(["export", "hits", "--store", store, "--layer", "fine", "--image", "1", "--y", "0",
                 "--x", "9", "--out", str(out)]) == EXIT_INPUT
    assert out.read_text() == "old" and _listing(tmp_path) == ["h.csv"]
    assert main(["export", "hits", "--store", store, "--layer", "fine", "--image", "1", "--y", "0",
                 "--x", "7", "--out", str(out)]) == EXIT_OK
    assert out.read_text().startswith("query,") and _listing(tmp_path) == ["h.csv"]
    # a Python caller gets the same typed errors
    from hoverlay.errors import UsageError
    from hoverlay.stores import OutOfRangeError, UnknownLayerError

    with pytest.raises(UnknownLayerError, match="unknown layer 'nope'"):
        export_hits(store, out, [HitQuery(1, 0, 0, layer="nope")])
    with pytest.raises(OutOfRangeError):
        export_hits(store, out, [(1, 0, 8)], layer="fine")
    with pytest.raises(UsageError, match="k: 0 is not a positive integer"):
        export_hits(store, out, [(1, 0, 0)], layer="fine", k=0)
    with pytest.raises(UsageError, match="not \\(image, y, x\\) integers"):
        export_hits(store, out, [(1, 0, 0.5)], layer="fine")
    assert out.read_text().startswith("query,")


def test_without_pyarrow_parquet_names_the_extra_and_csv_still_works(store, tmp_path):
    code = ("import sys\nsys.modules['pyarrow'] = None  # as if pyarrow were not installed\n"
            "from hoverlay.cli import main\n"
            "args = ['export', 'hits', '--store', {store!r}, '--layer', 'fine', '--image', '2', '--y', '1', "
            "'--x', '1', '--out', {out!r}]\nraise SystemExit(main(args))")
    parquet = str(tmp_path / "h.parquet")
    r = subprocess.run([sys.executable, "-c", code.format(store=store, out=parquet)], capture_output=True, text=True)
    assert r.returncode == EXIT_INPUT and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("Parquet output needs the package pyarrow, which is not installed: "
                                     "pip install 'hoverlay[export]' (or write .csv)")
    assert not os.path.exists(parquet)
    r = subprocess.run([sys.executable, "-c", code.format(store=store, out=str(tmp_path / "h.csv"))],
                       capture_output=True, text=True)
    assert r.returncode == EXIT_OK, r.stderr
    assert "wrote 32 hits of 1 query (fine)" in r.stdout
    vectors = code.replace("'hits'", "'vectors'").replace(", '--image', '2', '--y', '1', '--x', '1'",
                                                          ", '--format', 'parquet'")
    r = subprocess.run([sys.executable, "-c", vectors.format(store=store, out=str(tmp_path / "v"))],
                       capture_output=True, text=True)
    assert r.returncode == EXIT_INPUT and "hoverlay[export]" in r.stderr and not (tmp_path / "v").exists()


def test_the_export_command_imports_neither_torch_nor_panel(store, tmp_path):
    out = str(tmp_path / "h.csv")
    mods = modules_after("from hoverlay.cli import main\n"
                         f"assert main(['export', 'hits', '--store', {store!r}, '--layer', 'coarse', '--image', '0', "
                         f"'--y', '0', '--x', '0', '--out', {out!r}]) == 0")
    assert not {"torch", "panel", "bokeh", "hoverlay.pipeline", "pyarrow", "fiftyone"} & mods
    mods = modules_after("import hoverlay.stores.exports, hoverlay.stores.to_fiftyone, hoverlay.stores.export_options")
    assert not {"torch", "panel", "pyarrow", "fiftyone"} & mods


# =================================================================================== vectors
def _ok_vectors(reader, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """What an export must hold: (ids (n, 4), vectors (n, D)) of the ok images in image order."""
    g = reader.geometry(layer)
    ok = np.flatnonzero(reader.table().ok)
    vecs = reader.vectors(layer, ok).reshape(-1, g.dim)
    image = np.repeat(ok, g.patches_per_image)
    y, x = np.divmod(np.tile(np.arange(g.patches_per_image), len(ok)), g.width)
    pid = image * g.patches_per_image + y * g.width + x
    return np.stack([image, y, x, pid], axis=1), vecs


def test_vectors_as_npy_shards_equal_the_store_for_ok_images(store, tmp_path):
    out = tmp_path / "v"
    assert main(["export", "vectors", "--store", store, "--layer", "fine", "--out", str(out),
                 "--shard-size", "1000"]) == EXIT_OK
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["dim"] == 16 and manifest["images"] == N_OK + 1
    assert manifest["id_columns"] == list(ID_COLUMNS) == ["image", "y", "x", "patch_id"]
    assert [s["count"] for s in manifest["shards"]] == [1000, 1000, 624]  # 41 ok images x 64 patches
    assert _listing(out / "embeddings") == _listing(out / "ids") == [f"part-0000{i}.npy" for i in range(3)]
    emb = [np.load(out / s["embeddings"]) for s in manifest["shards"]]
    ids = [np.load(out / s["ids"]) for s in manifest["shards"]]
    assert all(e.dtype == np.float16 and e.ndim == 2 for e in emb) and all(i.dtype == np.int64 for i in ids)
    assert [len(e) for e in emb] == [len(i) for i in ids] == [1000, 1000, 624]
    want_ids, want = _ok_vectors(open_store(store), "fine")
    np.testing.assert_array_equal(np.concatenate(emb), want)  # bit for bit: the stored float16
    np.testing.assert_array_equal(np.concatenate(ids), want_ids)
    assert FAILED not in np.concatenate(ids)[:, 0]
    assert _listing(tmp_path) == ["v"]  # no temporary folder left

    export_vectors(store, "coarse", tmp_path / "v32", dtype="float32")
    (emb32,) = [np.load(p) for p in sorted((tmp_path / "v32" / "embeddings").iterdir())]
    want_ids, want = _ok_vectors(open_store(store), "coarse")
    assert emb32.dtype == np.float32
    np.testing.assert_array_equal(emb32, want.astype(np.float32))


def test_vectors_as_parquet_round_trip(store, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "p"
    done = export_vectors(store, "coarse", out, format="parquet", shard_size=300)
    assert (done.format, done.dtype, done.vectors, done.shards) == ("parquet", "float32", 41 * 16, 3)
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    tables = [pq.read_table(f) for f in files]
    assert tables[0].column_names == [*ID_COLUMNS, "embedding"]
    emb = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    ids = np.concatenate([np.stack([t.column(c).to_numpy() for c in ID_COLUMNS], axis=1) for t in tables])
    want_ids, want = _ok_vectors(open_store(store), "coarse")
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, want.astype(np.float32))  # the float16 values, widened exactly
    np.testing.assert_array_equal(ids, want_ids)
    half = export_vectors(store, "coarse", tmp_path / "p16", format="parquet", dtype="float16")
    t = pq.read_table(tmp_path / "p16" / "part-00000.parquet")
    np.testing.assert_array_equal(np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), want)
    assert half.dtype == "float16"


def test_bad_vectors_exports_write_nothing(store, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [(["--layer", "fine", "--out", str(taken)], EXIT_INPUT, "is not an empty folder"),
             (["--layer", "bogus", "--out", str(tmp_path / "a")], EXIT_INPUT, "unknown layer 'bogus'"),
             (["--layer", "fine", "--out", str(tmp_path / "b"), "--format", "hdf5"], EXIT_USAGE,
              "--format: 'hdf5' is not one of npy, parquet"),
             (["--layer", "fine", "--out", str(tmp_path / "c"), "--shard-size", "0"], EXIT_USAGE,
              "is not a positive integer"),
             (["--layer", "fine", "--out", str(tmp_path / "no" / "d")], EXIT_INPUT, "does not exist"),
             (["--out", str(tmp_path / "e")], EXIT_USAGE, "missing --layer")]
    for args, code, says in cases:
        assert main(["export", "vectors", "--store", store, *args]) == code, args
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert _listing(tmp_path) == ["taken"] and _listing(taken) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "vectors", "--store", store, "--layer", "fine", "--out", str(empty)]) == EXIT_OK
    assert "wrote 2624 float16 vectors of 41 images (layer fine) as 1 npy shard" in capsys.readouterr().out
    assert _listing(empty) == ["embeddings", "ids", "manifest.json"]


def test_autofaiss_builds_an_index_from_the_npy_export(store, tmp_path):
    autofaiss = pytest.importorskip("autofaiss")
    export_vectors(store, "fine", tmp_path / "v", shard_size=1000)
    index, _ = autofaiss.build_index(embeddings=str(tmp_path / "v" / "embeddings"),
                                     index_path=str(tmp_path / "knn.index"),
                                     index_infos_path=str(tmp_path / "infos.json"),
                                     metric_type="ip", max_index_memory_usage="100MB",
                                     current_memory_available="500MB", verbose=30)
    ids = np.concatenate([np.load(p) for p in sorted((tmp_path / "v" / "ids").iterdir())])
    assert index.ntotal == len(ids)
    reader = open_store(store)
    q = reader.vectors("fine", 3)[2, 5].astype(np.float32)[None]
    _, rows = index.search(q, 1)
    assert tuple(ids[rows[0][0]][:3]) == (3, 2, 5)  # row numbers map back through the ids files


# ================================================================================== explorer
def test_the_topk_panel_downloads_its_hits_as_csv(store):
    from hoverlay.explorer.app import create_app

    app = create_app(store, page_size=6, ncols=3, k=5, browser_hover_budget=0).app
    cards_view = app.topk.cards
    assert cards_view.download.disabled and cards_view.download.filename == "hoverlay-topk.csv"
    app.grid._on_pointer("data", None, {"tile": [4], "y": [2], "x": [5], "click": [0]})  # a rest on image 4
    cards = cards_view.cards
    assert len(cards) == 5 and not any("row" in c for c in cards)  # the browser gets only the cards
    assert not cards_view.download.disabled
    data = cards_view.download.callback().getvalue().decode("utf-8")  # what the button serves
    rows = list(csv.DictReader(io.StringIO(data)))
    assert list(rows[0]) == ["rank", *HIT_COLUMNS]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [(int(r["image"]), int(r["y"]), int(r["x"])) for r in rows] == [(c["image"], c["y"], c["x"]) for c in cards]
    assert [round(float(r["score"]), 6) for r in rows] == [c["score"] for c in cards]
    _, top = _search(store, "fine", 4, 2, 5, 5)
    assert [int(r["patch_id"]) for r in rows] == top.ids.tolist()  # the same search as the CLI
    assert [float(r["score"]) for r in rows] == top.scores.astype(float).tolist()
    table = open_store(store).table()
    for r in rows:
        label = table["label"][int(r["image"])]
        assert r["label"] == ("'" + label if label[0] in "=+-@" else label)  # no formula in a spreadsheet
        assert r["source"] == table["source"][int(r["image"])] and r["layer"] == "fine"


def test_topk_cards_without_rows_still_download():
    from hoverlay.explorer.topk_view import TopKCards

    view = TopKCards()
    view.show([{"image": 1, "y": 2, "x": 3, "score": 0.5, "label": "@me", "src": ""}])
    rows = list(csv.reader(io.StringIO(view.csv_file().getvalue().decode())))
    assert rows == [["rank", "image", "y", "x", "score", "label"], ["1", "1", "2", "3", "0.5", "'@me"]]
    view.show([])
    assert view.download.disabled


# ================================================================================== FiftyOne
@pytest.mark.parametrize("width,height", [(96, 80), (80, 96), (64, 64), (201, 77)])
def test_patch_boxes_map_back_to_the_source_as_the_preprocessing_crops(width, height):
    """A source whose red channel is its x and green its y coordinate: after the pipeline's own
    resize + centre crop, each cell's pixels have the colours the box says they come from (to
    under a level of 255; one source pixel of offset is 1.3 to 6.5 levels at these sizes)."""
    from PIL import Image

    from hoverlay.pipeline.preprocess import resize_center_crop

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([(xx + 0.5) / width * 255, (yy + 0.5) / height * 255, np.zeros_like(xx)], axis=-1)
    crop = resize_center_crop(Image.fromarray(rgb.round().astype(np.uint8)), 32).astype(np.float64)
    for h, w in [(8, 8), (4, 4), (7, 7)]:
        for y in range(h):
            for x in range(w):
                bx, by, bw, bh = source_box(y, x, (h, w), 32, width, height)
                assert bx >= 0 and by >= 0 and bx + bw <= 1 + 1e-9 and by + bh <= 1 + 1e-9
                cy, cx = int((y + 0.5) * 32 / h), int((x + 0.5) * 32 / w)  # a pixel of the cell
                # where that pixel's centre lies in the box, as a fraction of the source
                sx = bx + (cx + 0.5 - x * 32 / w) / (32 / w) * bw
                sy = by + (cy + 0.5 - y * 32 / h) / (32 / h) * bh
                if 2 <= cx < 30:  # bicubic clamps at the crop's own border
                    assert crop[cy, cx, 0] == pytest.approx(sx * 255, abs=1.0), (y, x)
                if 2 <= cy < 30:
                    assert crop[cy, cx, 1] == pytest.approx(sy * 255, abs=1.0), (y, x)


def test_source_sizes_follow_the_exif_rotation(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the pipeline sees 40 x 60
    Image.new("RGB", (60, 40)).save(tmp_path / "r.jpg", exif=exif)
    Image.new("RGB", (60, 40)).save(tmp_path / "p.png")
    assert oriented_size(str(tmp_path / "r.jpg")) == (40, 60)
    assert oriented_size(str(tmp_path / "p.png")) == (60, 40)


def test_fiftyone_dataset_of_sources_with_hits_as_detections(tmp_path, generated_images):
    fo = pytest.importorskip("fiftyone")
    from fiftyone import ViewField as F

    from hoverlay.pipeline.build import build
    from hoverlay.stores.to_fiftyone import export_fiftyone

    images = generated_images(5)
    url = str(tmp_path / "s")
    build(images, url, model="python:test_build:tiny_model", layers=["1", "3"], size=64, index=False, quiet=True)
    export_hits(url, tmp_path / "h.csv", [(0, 1, 1)], layer="3", k=4)
    name = f"hoverlay-test-{os.getpid()}"
    done = export_fiftyone(url, name, hits=tmp_path / "h.csv", persistent=False, overwrite=True)
    try:
        ds = done.dataset
        assert len(ds) == 5 and done.detections == 4
        sample = ds.match(F("hoverlay_image") == 0).first()
        assert sample.ground_truth.label == "gen"
        first = sample.hits.detections[0]
        assert first.rank == 1 and first.score == pytest.approx(1.0, abs=2e-3)
        assert all(0 <= v <= 1 for v in first.bounding_box)
    finally:
        fo.delete_dataset(name)


# ============================================================================ documentation
def test_the_readme_documents_every_export_flag():
    readme = (ROOT / "README.md").read_text()
    assert "hoverlay export hits" in readme and "hoverlay export vectors" in readme
    for _, options in EXPORTS.values():
        for row in options.table():
            assert row in readme, row
