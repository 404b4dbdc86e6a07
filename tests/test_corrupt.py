"""A damaged root document is an error, never data: ``committed`` is checked against the arrays."""

import json
import os

import numpy as np
import pytest

from hoverlay.cli import main
from hoverlay.errors import EXIT_INPUT
from hoverlay.stores import CorruptStoreError, LayerGeometry, open_store
from hoverlay.stores.synthetic import make_synthetic_store


def set_committed(url: str, value) -> None:
    path = os.path.join(url, "zarr.json")
    doc = json.loads(open(path).read())
    doc["attributes"]["hoverlay"]["committed"] = value
    open(path, "w").write(json.dumps(doc))


@pytest.mark.parametrize("value,message", [
    (1000, "says 1000 images are committed, but images/pixels holds 18 rows"),
    (-5, "committed = -5"),
    ("lots", "committed = 'lots'"),
    (2.5, "committed = 2.5"),
])
def test_committed_beyond_the_arrays_is_refused_everywhere(tmp_path, value, message, capsys):
    url = str(tmp_path / "s")
    make_synthetic_store(url, 18, layers={"l": LayerGeometry(2, 2, 8)}, image_size=8, chunk=4)
    table_before = open_store(url).table()["hash"].tolist()
    set_committed(url, value)
    with pytest.raises(CorruptStoreError, match=message.replace("(", r"\(")):
        open_store(url)
    assert main(["info", url]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    images = tmp_path / "images"
    images.mkdir()
    from conftest import write_generated_images

    write_generated_images(str(images), 2)
    assert main(["build", "--images", str(images), "--store", url, "--no-index"]) == EXIT_INPUT
    assert message in capsys.readouterr().err
    set_committed(url, 18)  # repaired by hand: nothing was appended meanwhile
    assert open_store(url).table()["hash"].tolist() == table_before


def zero_model():
    """A network whose every output is 0 (python:test_corrupt:zero_model)."""
    import torch.nn as nn

    conv = nn.Conv2d(3, 4, 8, stride=8)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU())


def test_a_row_marked_ok_never_holds_all_zero_vectors(tmp_path, generated_images):
    from hoverlay.pipeline.build import build

    src = generated_images(3)
    summary = build(src, str(tmp_path / "s"), model="python:test_corrupt:zero_model", layers=["1"], size=32,
                    quiet=True)
    assert summary.added == 3 and len(summary.failed) == 3
    assert all("all-zero activations in layer '1'" in reason for _, reason in summary.failed)
    table = open_store(tmp_path / "s").table()
    assert not table.ok.any()


def _damaged_store(tmp_path, how: str) -> str:
    from hoverlay.pipeline.indexing import update_index

    url = str(tmp_path / "s")
    make_synthetic_store(url, 12, layers={"l": LayerGeometry(2, 2, 8)}, image_size=8, chunk=4)
    update_index(open_store(url), "l", n_queries=5)
    shard = os.path.join(url, "layers", "l", "vectors", "c", "1", "0", "0", "0")  # images 4..7
    if how == "missing":
        os.remove(shard)
    else:
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2])
    return url


@pytest.mark.parametrize("how,says", [("missing", "are missing (read as zeros)"), ("truncated", "does not decode")])
def test_a_missing_or_truncated_shard_is_an_error_naming_images_and_file(tmp_path, how, says, capsys):
    from hoverlay.stores.search import iter_vector_blocks

    url = _damaged_store(tmp_path, how)
    reader = open_store(url)
    assert reader.vectors("l", [0, 1, 8]).shape == (3, 2, 2, 8)  # the other shards read fine
    shard = f"{url}/layers/l/vectors/c/1/0/0/0"
    with pytest.raises(CorruptStoreError, match=r"layers/l/vectors of image\(s\) 4") as err:
        reader.vectors("l", [4, 5])
    assert says in str(err.value) and shard in str(err.value)
    with pytest.raises(CorruptStoreError, match="image"):
        reader.patch_vectors("l", np.array([reader.patch_id("l", 6, 1, 1)]))
    with pytest.raises(CorruptStoreError):
        list(iter_vector_blocks(reader, "l"))
    from hoverlay.pipeline.indexing import update_index

    # a rebuild of the index reads every vector: an error naming the file (one line in the CLI)

    with pytest.raises(CorruptStoreError, match="vectors/c/1"):
        update_index(open_store(url), "l", rebuild=True, n_queries=5)


def test_a_build_over_a_damaged_store_is_one_line_naming_the_file(tmp_path, generated_images, capsys):
    src = generated_images(8)
    url = str(tmp_path / "s")
    tiny = ["--model", "python:test_build:tiny_model", "--layers", "1,3", "--size", "64", "--chunk", "4"]
    assert main(["build", "--images", src, "--store", url, "-q", *tiny]) == 0
    os.remove(os.path.join(url, "layers", "3", "vectors", "c", "1", "0", "0", "0"))
    capsys.readouterr()
    assert main(["build", "--images", src, "--store", url, "-q", "--rebuild-index"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "layers/3/vectors of image(s) 4" in err[0] and f"{url}/layers/3/vectors/c/1/0/0/0" in err[0]


def test_the_explorer_says_a_store_is_damaged_without_traceback_or_paths(tmp_path):
    import panel as pn

    from hoverlay.explorer.serve import session_factory

    url = _damaged_store(tmp_path, "missing")
    page = session_factory([url], {"browser_hover_budget": 0}, 0)()
    assert not isinstance(page, pn.pane.Alert)  # the page opens: the damage is per image
    app = page.app
    app.grid._on_pointer("data", None, {"tile": [1], "y": [0], "x": [0], "click": [0]})  # reads the layer
    captions = app.grid.shared.labels.data["text"]
    assert captions[4:8] == [f"#{i} unreadable" for i in range(4, 8)] and "unreadable" not in captions[3]
    shown = " ".join(captions) + app.state.message
    assert str(tmp_path) not in shown and "Traceback" not in shown


SHUTDOWN_READER = """
import sys, threading, time
import numpy as np
from hoverlay.stores import open_store
r = open_store(sys.argv[1])
def loop():
    i = 0
    while True:
        try:
            r.vectors("l", np.arange(16) + 16 * (i % 3))
            i += 1
        except Exception as exc:
            print("ERR", type(exc).__name__, exc, flush=True)
            return
threading.Thread(target=loop, daemon=True).start()
time.sleep(0.3)
"""


def test_a_read_cut_by_the_interpreter_exiting_is_not_reported_as_damage(tmp_path):
    """A reading thread (the explorer's read-ahead) still running when the process exits got
    "cannot schedule new futures after shutdown" from Zarr's executor, and the reader called the
    store damaged (naming a healthy shard); this test fails on the reader before the fix."""
    import subprocess
    import sys

    url = str(tmp_path / "s")
    make_synthetic_store(url, 48, layers={"l": LayerGeometry(28, 28, 240)}, image_size=8, chunk=16)
    for _ in range(4):
        out = subprocess.run([sys.executable, "-c", SHUTDOWN_READER, url], capture_output=True, text=True,
                             timeout=60)
        text = out.stdout + out.stderr
        assert "CorruptStoreError" not in text and "damaged" not in text, text
    assert open_store(url).vectors("l", np.arange(48)).shape == (48, 28, 28, 240)
