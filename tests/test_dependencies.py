"""The dependency direction pipeline -> stores <- explorer, checked in fresh interpreters."""

import os
import shutil
import subprocess
import sys

from conftest import modules_after

STORES = os.path.join(os.path.dirname(__file__), "..", "stores")
#: Every module of stores/, found on disk: a new one is checked without being listed here.
STORE_MODULES = sorted(f"hoverlay.stores.{f[:-3]}" for f in os.listdir(STORES)
                       if f.endswith(".py") and f != "__init__.py")


def test_stores_import_neither_torch_nor_panel():
    """One interpreter imports every module of stores/ (the contract both sides use): none may
    bring in torch, Panel or Bokeh, nor the optional pyarrow / fiftyone (imported when used)."""
    assert "hoverlay.stores.case_metrics" in STORE_MODULES and "hoverlay.stores.check" in STORE_MODULES
    mods = modules_after("import hoverlay.stores\n" + "\n".join(f"import {m}" for m in STORE_MODULES))
    heavy = {"torch", "panel", "bokeh", "pyarrow", "fiftyone", "hoverlay.pipeline", "hoverlay.explorer"} & set(mods)
    assert not heavy, heavy


def test_explorer_never_imports_torch():
    mods = modules_after("import hoverlay.explorer.app, hoverlay.explorer.serve, hoverlay.explorer.kernels")
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
    installed = [f if f.startswith("hoverlay/") else "hoverlay/" + f for f in tracked
                 if f.endswith((".py", ".js"))]  # the browser modules Panel serves ship too
    assert tracked and [p for p in installed if p not in names] == []
    assert not [n for n in names if n.split("/")[0] in ("stores", "pipeline", "explorer")]  # no generic names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hoverlay = hoverlay.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # installed from the wheel (not the editable tree), the namespace imports and the CLI runs
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import hoverlay.stores, hoverlay.pipeline.options, hoverlay.explorer.kernels, hoverlay.cli\n"
            "print(hoverlay.stores.__file__)\nraise SystemExit(hoverlay.cli.main(['--version']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(str(site)) and "hoverlay 0." in out.stdout


def _closure(requirements: list[str]) -> set[str]:
    """Distributions (normalised names) that installing ``requirements`` brings in, transitively,
    as the installed metadata says (extras only where a requirement names them)."""
    import re
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        env = {"extra": ""}
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue
        for sub in dist.requires or []:
            r = Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ["", *req.extras]):
                todo.append(r)
    return seen


def test_a_serve_only_install_has_everything_serve_and_info_import():
    """``pip install hoverlay`` (no extras) must be enough for ``hoverlay serve`` and ``info``."""
    import re
    from importlib.metadata import packages_distributions, requires

    base = [r for r in requires("hoverlay") or [] if "extra ==" not in r]
    assert not [r for r in base if r.split(">")[0].split("[")[0] in ("torch", "torchvision", "dask")]
    provided = _closure(base) | {"hoverlay"}
    mods = modules_after("import hoverlay.explorer.serve, hoverlay.explorer.app, hoverlay.stores.info\n"
                          "from hoverlay.cli import command_parser; command_parser('serve')")
    owners = packages_distributions()
    # imported when present, not needed: setuptools' site hook; numcodecs' optional msgpack codec
    optional = {"_distutils_hack", "msgpack"}
    needed = {re.sub(r"[-_.]+", "-", d).lower() for m in mods - optional if "." not in m and m in owners
              for d in owners[m]}
    assert needed - provided == set()


def _explorer_imports() -> dict[str, set[str]]:
    """Each explorer module's imports of other explorer modules (``TYPE_CHECKING`` ones included)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "explorer"
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1:
                    found |= {module.split(".")[0]} if module else {a.name for a in node.names}
                elif module.startswith("hoverlay.explorer."):
                    found.add(module.split(".")[2])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("hoverlay.explorer.")}
        graph[path.stem] = found & names
    return graph


def test_explorer_modules_form_no_import_circle_and_only_entry_points_import_the_app():
    graph = _explorer_imports()
    # the state and views never import the app that composes them; only the server entry points do
    assert {m for m, deps in graph.items() if "app" in deps} <= {"serve", "app_module"}
    assert not graph["state"] & {"app", "controls", "grid_view", "query_view", "topk_panel", "compare",
                                 "sweep_view", "groups_view", "figures", "browser_hover"}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, f"import circle: {' -> '.join([*visiting[visiting.index(module):], module])}"
        visiting.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
