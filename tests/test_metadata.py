"""``build --metadata``: a user's spreadsheet joined to images, stored as columns, shown and
filtered in the explorer; bad files refused before anything is written."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import write_generated_images

from hoverlay.cli import main
from hoverlay.pipeline.build import build
from hoverlay.pipeline.metadata import MetadataError, read_metadata
from hoverlay.pipeline.sources import discover
from hoverlay.stores import StoreMismatchError, open_store
from hoverlay.stores.synthetic import make_synthetic_store

RESNET = {"model": "torchvision:resnet18", "weights": "none", "layers": ["layer3"], "quiet": True,
          "index": False}


@pytest.fixture
def photos(tmp_path):
    """cats/ (2), dogs/ (2) and one image directly in the source folder."""
    root = tmp_path / "photos"
    write_generated_images(str(root), 2, seed=1, label="cats")
    write_generated_images(str(root), 2, seed=2, label="dogs")
    flat = write_generated_images(str(tmp_path / "tmp"), 1, seed=3, label="x")[0]
    os.replace(flat, root / "loose.png")
    return root


def _csv(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_images_directly_in_the_source_folder_get_no_label(photos):
    found = {os.path.basename(i.uri): i for i in discover(str(photos)).images}
    assert found["loose.png"].label == "" and found["loose.png"].relative == "loose.png"
    assert found["img_1_0000.png"].label == "cats"
    assert found["img_1_0000.png"].relative == "cats/img_1_0000.png"
    # several sources keep each one's own labels and relative paths
    both = discover([str(photos / "cats"), str(photos / "dogs")]).images
    assert {i.label for i in both} == {""} and {i.relative for i in both} >= {"img_1_0000.png"}


def test_build_joins_metadata_by_path_and_the_label_replaces_the_folders(photos, tmp_path):
    meta = _csv(tmp_path / "meta.csv",
                "path,species,weight kg,label,note\n"
                "cats/img_1_0000.png,Felis catus,4.5,tabby,=HYPERLINK(\"x\")\n"
                "dogs/img_2_0001.png,Canis familiaris,,hound,<b>bold</b> café\n"
                "loose.png,unknown,12,,\n"
                "gone/missing.png,ghost,1,,\n")
    store = str(tmp_path / "s.zarr")
    summary = build(str(photos), store, metadata=meta, **RESNET)
    assert summary.metadata_missing == 2 and summary.metadata_unmatched == 1
    assert "metadata: 2 added images had no row, 1 rows matched no image" in summary.line()
    reader = open_store(store)
    table = reader.table()
    assert reader.attrs.metadata == {"species": "str", "weight kg": "float64", "note": "str"}
    by_name = {os.path.basename(s): i for i, s in enumerate(table["source"])}
    i_cat, i_dog, i_loose = by_name["img_1_0000.png"], by_name["img_2_0001.png"], by_name["loose.png"]
    i_plain = by_name["img_1_0001.png"]
    md = table.metadata
    assert md["species"][i_cat] == "Felis catus" and md["weight kg"][i_cat] == 4.5
    assert md["note"][i_dog] == "<b>bold</b> café"  # stored as given; escaped where shown
    assert np.isnan(md["weight kg"][i_dog]) and md["weight kg"][i_loose] == 12.0
    assert md["species"][i_plain] == "" and np.isnan(md["weight kg"][i_plain])  # no row
    labels = table["label"]
    assert labels[i_cat] == "tabby" and labels[i_dog] == "hound"
    assert labels[i_loose] == "" and labels[i_plain] == "cats"  # empty label in the file: none


def test_metadata_keyed_by_file_name_and_appended_with_the_same_columns(photos, tmp_path):
    meta = _csv(tmp_path / "m.csv", "file,site\nimg_1_0000.png,north\nloose.png,south\n")
    store = str(tmp_path / "s.zarr")
    build(str(photos / "cats"), store, metadata=meta, **RESNET)
    build(str(photos), store, metadata=meta, **RESNET)  # new images: dogs + loose
    table = open_store(store).table()
    site = dict(zip([os.path.basename(s) for s in table["source"]], table.metadata["site"], strict=True))
    assert site == {"img_1_0000.png": "north", "img_1_0001.png": "", "img_2_0000.png": "",
                    "img_2_0001.png": "", "loose.png": "south"}
    # other columns than the store's are refused before anything is written
    other = _csv(tmp_path / "o.csv", "file,site,year\nimg_1_0000.png,north,2020\n")
    write_generated_images(str(photos), 1, seed=9, label="birds")
    before = open_store(store).n_images
    with pytest.raises(StoreMismatchError, match=r"site \(text\).*not site \(text\), year \(number\)"):
        build(str(photos), store, metadata=other, **RESNET)
    assert open_store(store).n_images == before


def test_a_file_name_key_that_names_two_images_is_refused(photos, tmp_path):
    write_generated_images(str(photos / "dogs"), 1, seed=1, label="more")  # dogs/more/img_1_0000.png
    meta = _csv(tmp_path / "m.csv", "file,site\nimg_1_0000.png,north\n")
    with pytest.raises(MetadataError, match="names two images"):
        build(str(photos), str(tmp_path / "s.zarr"), metadata=meta, **RESNET)
    assert not os.path.exists(tmp_path / "s.zarr")


@pytest.mark.parametrize("text, message", [
    ("name,site\na.png,x\n", "no key column"),
    ("path,site\na.png,x\na.png,y\n", "'a.png' appears more than once"),
    ("path,site\n,x\n", "row 2 has an empty 'path'"),
    ("path,hash\na.png,x\n", "column 'hash' is one of the table's own"),
    ("path,a.utf8\na.png,x\n", "column name 'a.utf8' is not allowed"),
    ("path,site\n\"a.png,x\n", "cannot be read"),
])
def test_bad_metadata_files_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(MetadataError, match=message):
        read_metadata(_csv(tmp_path / "m.csv", text))


def test_bad_metadata_paths_and_bytes(tmp_path):
    with pytest.raises(MetadataError, match="does not exist"):
        read_metadata(str(tmp_path / "nope.csv"))
    with pytest.raises(MetadataError, match="use a .csv or .parquet"):
        read_metadata(_csv(tmp_path / "m.xlsx", "path\n"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,site\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(MetadataError, match="not UTF-8"):
        read_metadata(str(latin))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    with pytest.raises(MetadataError, match="cannot be read"):
        read_metadata(str(junk))


def test_parquet_metadata_keeps_its_types(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "m.parquet"
    pd.DataFrame({"path": ["a.png", "b.png"], "score": [0.5, None], "count": [3, 4],
                  "flag": [True, False]}).to_parquet(path)
    meta = read_metadata(str(path))
    assert meta.kinds == {"score": "float64", "count": "float64", "flag": "str"}
    assert meta.rows["a.png"]["count"] == 3.0 and np.isnan(meta.rows["b.png"]["score"])
    assert meta.rows["b.png"]["flag"] == "False"


def test_cli_refuses_a_bad_metadata_file_before_writing(photos, tmp_path, capsys):
    bad = _csv(tmp_path / "m.csv", "name,site\na.png,x\n")
    store = tmp_path / "s.zarr"
    code = main(["build", "--images", str(photos), "--store", str(store), "--metadata", bad,
                 "--model", "torchvision:resnet18", "--weights", "none", "--layers", "layer3", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "no key column" in err[0]
    assert not store.exists()


# ------------------------------------------------------------------------------- explorer
@pytest.fixture(scope="module")
def meta_store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("meta") / "store")
    n = 12
    make_synthetic_store(url, n, image_size=32, chunk=4, metadata={
        "site": ["north", "south", "<script>x</script>"] * 4,
        "depth": [float(i) for i in range(n)]})
    return url


def test_explorer_filters_on_any_column_and_captions_show_chosen_columns(meta_store):
    from hoverlay.explorer.app import create_app
    from hoverlay.explorer.paging import MISSING

    app = create_app(meta_store, page_size=12, ncols=4).app
    assert app.state.has_metadata and app.state.param.filter_by.objects == ["label", "site", "depth"]
    app.state.filter_by = "site"
    assert app.state.param.label.objects[1:] == ["<script>x</script>", "north", "south"]
    app.state.label = "south"
    assert list(app.state.page_ids()) == [1, 4, 7, 10]
    app.state.filter_by = "depth"  # a number column: its distinct values (few), then ranges (many)
    assert app.state.label == "(all)" and len(app.state.page_ids()) == 12
    app.state.label = "3"
    assert list(app.state.page_ids()) == [3]
    assert MISSING not in app.state.param.label.objects
    app.state.label = "(all)"
    app.state.captions = ["site", "depth"]
    captions = app.grid.shared.labels.data["text"]
    assert captions[3] == "#3 a · north · 3"  # the tiles' text, redrawn without a page change
    assert captions[2] == "#2 c · <script>x<…" and len(captions[2]) == 110 // 6  # one tile wide
    app.state.tile_px = 300
    assert app.state.tile_captions(np.array([2]))[0] == "#2 c · <script>x</script> · 2"  # canvas text: no HTML
    # hostile URL values: an unknown column or value is a message, not an error
    app.state.apply_url({"filter_by": "nope", "label": "also nope"})
    assert "filter=" in app.state.message or "label=" in app.state.message


def test_filter_choices_bin_many_numbers_and_offer_missing():
    from hoverlay.explorer.paging import MISSING, NUMBER_BINS, filter_choices, filter_mask

    values = np.concatenate([np.linspace(0, 1, 500), [np.nan]])
    choices = filter_choices(values)
    assert len(choices) == NUMBER_BINS + 1 and choices[-1] == MISSING
    kept = sum(int(filter_mask(values, c).sum()) for c in choices)
    assert kept == len(values)  # every image is in exactly one choice
    assert filter_mask(values, MISSING).sum() == 1
    assert filter_mask(values, "[not a range").sum() == 0
    text = np.array(["b", "", "a", "b"], dtype=object)
    assert filter_choices(text) == ["a", "b", MISSING]
    assert list(filter_mask(text, MISSING)) == [False, True, False, False]


def test_info_names_the_metadata_columns(meta_store, capsys):
    import json

    assert main(["info", meta_store]) == 0
    assert "metadata   site (text, 0 missing), depth (number, 0 missing)" in capsys.readouterr().out
    assert main(["info", "--json", meta_store]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["metadata"] == {"site": {"kind": "str", "missing": 0}, "depth": {"kind": "float64", "missing": 0}}


def test_top_k_cards_show_the_chosen_columns(meta_store):
    from hoverlay.explorer.app import create_app

    app = create_app(meta_store, page_size=12, ncols=4, k=3).app
    app.state.captions = ["site"]
    app.grid._on_pointer("data", None, {"tile": [2], "y": [1], "x": [1], "click": [0]})  # synchronous here
    cards = app.topk.cards.cards
    assert cards and cards[0]["image"] == 2 and cards[0]["extra"] == ["site: <script>x</script>"]
    app.state.captions = ["site", "depth"]
    assert app.topk.cards.cards[0]["extra"] == ["site: <script>x</script>", "depth: 2"]
    # what the browser gets: the same cards as one JSON string (drawn there as text nodes)
    import json

    assert json.loads(app.topk.cards.payload) == app.topk.cards.cards
