"""A damaged root document is an error, never data: ``committed`` is checked against the arrays."""

import json
import os

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
