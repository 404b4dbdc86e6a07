"""Every notebook executes top to bottom on the offline default model (real kernel, real stores)."""

import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
NAMES = sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nbdata"))


def test_there_is_one_notebook_per_paper_section():
    assert [n.split("_")[0] for n in NAMES] == ["01", "02", "03", "04", "05"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOVERLAY_NB_DATA", data_dir)
    shutil.copy(os.path.join(NOTEBOOKS, name), tmp_path / name)
    nb = nbformat.read(tmp_path / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) or "text/html" in o.get("data", {})
               or "application/vnd.holoviews_load.v0+json" in o.get("data", {}) for o in outputs)
