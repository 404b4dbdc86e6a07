"""The dependency direction pipeline -> stores <- explorer, checked in fresh interpreters."""

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["stores", "stores.search", "stores.groups", "stores.transforms",
                                    "stores.info"])
def test_stores_import_neither_torch_nor_panel(module):
    mods = _modules_after(f"import {module}")
    assert "torch" not in mods and "panel" not in mods and "bokeh" not in mods


def test_explorer_never_imports_torch():
    mods = _modules_after("import explorer.app, explorer.serve, explorer.kernels")
    assert "torch" not in mods and "pipeline" not in mods and "sklearn" not in mods
