"""The dependency direction pipeline -> stores <- explorer, checked in fresh interpreters."""

import shutil
import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["hoverlay.stores", "hoverlay.stores.search", "hoverlay.stores.groups",
                                    "hoverlay.stores.transforms", "hoverlay.stores.info"])
def test_stores_import_neither_torch_nor_panel(module):
    mods = _modules_after(f"import {module}")
    assert "torch" not in mods and "panel" not in mods and "bokeh" not in mods


def test_explorer_never_imports_torch():
    mods = _modules_after("import hoverlay.explorer.app, hoverlay.explorer.serve, hoverlay.explorer.kernels")
    assert "torch" not in mods and "hoverlay.pipeline" not in mods and "sklearn" not in mods


def test_the_installed_package_has_every_module_and_the_console_script(tmp_path):
    """What ``pip install .`` (the Dockerfile's install step) ships: no module left behind."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "-C", str(root), "ls-files"], check=True, capture_output=True,
                           text=True).stdout.split()
    src = tmp_path / "src"  # a copy of the working tree's tracked files: setuptools writes build/ there
    for f in files:
        if (root / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("hoverlay-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = [f for f in files if f.startswith(("stores/", "pipeline/", "explorer/", "hoverlay/"))]
    installed = [f if f.startswith("hoverlay/") else "hoverlay/" + f for f in tracked if f.endswith(".py")]
    assert tracked and [p for p in installed if p not in names] == []
    assert not [n for n in names if n.split("/")[0] in ("stores", "pipeline", "explorer")]  # no generic names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hoverlay = hoverlay.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
