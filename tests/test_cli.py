"""The command line as a new user meets it: typos, bad values, offline weights, URLs, progress.

Each test here reproduces a failure observed on the previous CLI (issue: "One import namespace,
a fast and helpful CLI"): real builds with a real (tiny) torch model, real stores on disk, fresh
interpreters where the question is what gets imported.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import modules_after, write_generated_images

import hoverlay
from hoverlay.cli import COMMANDS, main
from hoverlay.errors import EXIT_CODES, EXIT_INPUT, EXIT_OK, EXIT_USAGE
from hoverlay.options import OptionError, load_config
from hoverlay.pipeline.build import build
from hoverlay.pipeline.options import BUILD_OPTIONS
from hoverlay.stores import open_store

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(ROOT / "tests")
TINY = ["--model", "python:test_build:tiny_model", "--layers", "1,3", "--size", "64", "--no-index"]
TINY_KW = {"model": "python:test_build:tiny_model", "layers": ["1", "3"], "size": 64, "index": False}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m hoverlay ARGS`` in a fresh interpreter (stdout/stderr not a terminal)."""
    full_env = {**os.environ, "PYTHONPATH": TESTS, **(env or {})}
    return subprocess.run([sys.executable, "-m", "hoverlay", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=TESTS)


@pytest.fixture
def images(tmp_path) -> str:
    folder = str(tmp_path / "images")
    write_generated_images(folder, 6, seed=3)
    return folder


# ================================================================== the top level, fast
def test_version_and_python_dash_m():
    from importlib.metadata import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hoverlay {hoverlay.__version__}"
    assert version("hoverlay") == hoverlay.__version__  # pyproject takes it from the package
    r = run_cli("--help")
    assert r.returncode == 0
    assert all(name in r.stdout for name in COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hoverlay {command}") and "--verbose" in out


def test_help_is_fast_and_imports_nothing_heavy():
    took = []
    for _ in range(3):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "hoverlay", "--help"], capture_output=True)
        took.append(time.perf_counter() - t)
        assert r.returncode == 0
    assert min(took) <= 0.5, took
    mods = modules_after("from hoverlay.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not {"numpy", "torch", "panel", "bokeh", "zarr", "faiss", "dask"} & mods


def test_build_never_imports_panel_and_serve_never_imports_torch(tmp_path, images):
    store = str(tmp_path / "s")
    mods = modules_after(f"from hoverlay.cli import main\nassert main({['build', '--images', images, '--store', store, '-q', *TINY]!r}) == 0")
    assert "torch" in mods  # it did build
    assert not {"panel", "bokeh", "holoviews"} & mods
    assert open_store(store).n_images == 6
    mods = modules_after(
        "from hoverlay.cli import command_parser\n"
        f"args = command_parser('serve').parse_args([{store!r}, '--port', '0'])\n"
        "from hoverlay.explorer.serve import serve, session_factory\n"
        f"server = serve(args.stores, port=0, start=False)\n"
        f"session_factory(args.stores, {{}}, 0)()\n")
    assert "panel" in mods and "torch" not in mods and "hoverlay.pipeline" not in mods
    mods = modules_after(f"from hoverlay.cli import main\nassert main(['info', {store!r}]) == 0")
    assert not {"torch", "panel", "bokeh"} & mods


# =========================================================== usage errors, before any write
def test_unknown_flag_gets_the_subcommands_usage_and_the_closest_flag(tmp_path, capsys):
    assert main(["build", "--imges", "x", "--store", str(tmp_path / "s")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: hoverlay build")
    assert "--imges (did you mean --images?)" in err
    assert main(["biuld"]) == EXIT_USAGE
    assert "did you mean build?" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag,value,expected", [
    ("--batch-size", "sixteen", "is not a positive integer"),
    ("--batch-size", "-2", "is not a positive integer"),
    ("--batch-size", "0", "is not a positive integer"),
    ("--chunk", "0", "is not a positive integer"),
    ("--workers", "-1", "is not a positive integer"),
    ("--index-memory", "lots", "is not a size in bytes"),
    ("--scheduler", "thread", "threads, sync, processes or a scheduler address"),
    ("--device", "gpu", "cpu, cuda, cuda:N"),
    ("--rotate", "0:360", "start:stop:step"),
    ("--storage-options", "{not json", "is not a JSON object"),
])
def test_bad_flag_values_are_refused_before_any_write(tmp_path, images, capsys, flag, value, expected):
    store = tmp_path / "s"
    assert main(["build", "--images", images, "--store", str(store), flag, value]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == f"hoverlay build: {flag}: {value!r} {expected}" or (expected in err and flag in err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not store.exists()


def test_config_values_are_type_checked_before_any_write(tmp_path, images, capsys):
    store = tmp_path / "s"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'images = "{images}"\nstore = "{store}"\nbatch_size = "sixteen"\n')
    assert main(["build", "--config", str(cfg)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "config key batch_size: 'sixteen' is not a positive integer" in err and "Traceback" not in err
    cfg.write_text(f'images = "{images}"\nstore = "{store}"\nbatch_size = -2\n')
    assert main(["build", "--config", str(cfg)]) == EXIT_USAGE
    cfg.write_text(f'images = "{images}"\nstore = "{store}"\nbatch_sise = 4\n')
    assert main(["build", "--config", str(cfg)]) == EXIT_USAGE
    assert "did you mean batch_size?" in capsys.readouterr().err
    assert not store.exists()
    # sizes as text are what people write in TOML: taken, as bytes
    cfg.write_text('index_memory = "8G"\nlayers = "a, b"\n')
    assert load_config(cfg, BUILD_OPTIONS) == {"index_memory": 8_000_000_000, "layers": ["a", "b"]}


def test_python_keywords_go_through_the_same_declarations(tmp_path, images):
    with pytest.raises(OptionError, match="unknown keyword 'batchsize'; did you mean batch_size"):
        build(images, str(tmp_path / "s"), batchsize=4)
    with pytest.raises(OptionError, match="keyword batch_size: -2 is not a positive integer"):
        build(images, str(tmp_path / "s"), batch_size=-2)
    with pytest.raises(OptionError, match="keyword index_memory"):
        build(images, str(tmp_path / "s"), index_memory=[8])
    assert not (tmp_path / "s").exists()


def test_bad_sources_and_store_paths_create_nothing(tmp_path, images, capsys):
    store = tmp_path / "s"
    assert main(["build", "--images", str(tmp_path / "missing"), "--store", str(store)]) == EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err and not store.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no images here")
    assert main(["build", "--images", str(empty), "--store", str(store)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "no image files found" in err and "README.txt" in err and not store.exists()
    regular = tmp_path / "file.zarr"
    regular.write_text("x")
    assert main(["build", "--images", images, "--store", str(regular)]) == EXIT_INPUT
    assert "is a file, not a store" in capsys.readouterr().err and regular.read_text() == "x"
    assert main(["build", "--images", images, "--store", images]) == EXIT_INPUT  # someone's folder
    assert "not a hoverlay store and not empty" in capsys.readouterr().err
    assert os.listdir(images) == ["gen"] and len(os.listdir(Path(images) / "gen")) == 6  # nothing added


# ======================================================================= models and weights
def test_offline_weights_are_one_line_with_what_to_do(tmp_path, images):
    env = {"TORCH_HOME": str(tmp_path / "torch-cache")}  # empty cache: a download would be needed
    r = run_cli("layers", "torchvision:resnet18", "--weights", "DEFAULT", env=env, timeout=120)
    assert r.returncode == EXIT_INPUT, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "torch cache" in err and "--weights none" in err and str(tmp_path / "torch-cache") in err
    r = run_cli("build", "--images", images, "--store", str(tmp_path / "s"), "--model",
                "torchvision:resnet18", env=env, timeout=120)
    assert r.returncode == EXIT_INPUT and "torch cache" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()
    # names and shapes do not need weights: listing works offline
    r = run_cli("layers", "torchvision:resnet18", env=env, timeout=120)
    assert r.returncode == 0 and re.search(r"^\* layer3\.1\.relu_1 \(layer3\)\s+D=256 H=14 W=14  >=0$", r.stdout, re.M), r.stdout


def test_weights_are_loaded_strictly(tmp_path, images, capsys):
    import torch
    import torchvision

    from hoverlay.pipeline.errors import WeightsError
    from hoverlay.pipeline.models import load_model

    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        net.fc.bias.fill_(0.25)  # not what a random init gives: proves the file was loaded
    state = net.state_dict()
    wrapped = tmp_path / "dataparallel.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, wrapped)
    adapter = load_model("torchvision:resnet18", str(wrapped))
    assert torch.equal(adapter.module.fc.bias, torch.full((1000,), 0.25))
    assert adapter.describe() == {"spec": "torchvision:resnet18", "weights": str(wrapped),
                                  "weights_container": "state_dict", "weights_prefix_stripped": "module."}
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")} | {"head.weight": state["fc.weight"]},
               partial)
    with pytest.raises(WeightsError, match=r"2 missing \(e.g. fc.bias, fc.weight\); 1 unexpected \(e.g. head.weight\)"):
        load_model("torchvision:resnet18", str(partial))
    store = tmp_path / "s"
    assert main(["build", "--images", images, "--store", str(store), "--model", "torchvision:resnet18",
                 "--weights", str(partial), "--no-index"]) == EXIT_INPUT
    assert "does not fit the model" in capsys.readouterr().err and not store.exists()
    # the store records how the file was read
    assert main(["build", "--images", images, "--store", str(store), "--model", "torchvision:resnet18",
                 "--weights", str(wrapped), "--layers", "layer4", "--no-index", "-q"]) == EXIT_OK
    assert open_store(store).model["weights_prefix_stripped"] == "module."


def test_an_existing_store_gives_model_weights_layers_and_size(tmp_path, images, capsys):
    store = str(tmp_path / "s")
    assert main(["build", "--images", images, "--store", store, "--chunk", "4", "-q", *TINY]) == 0
    more = str(tmp_path / "more")
    write_generated_images(more, 3, seed=9)
    assert main(["build", "--images", more, "--store", store, "-q", "--no-index"]) == 0
    r = open_store(store)
    assert r.n_images == 9 and r.layers == ["1", "3"] and r.image_size == 64 and r.attrs.chunk == 4
    assert r.model["spec"] == "python:test_build:tiny_model"
    capsys.readouterr()
    assert main(["build", "--images", more, "--store", store, "--model", "efficientnet-lite0"]) == EXIT_INPUT
    assert "was built with model 'python:test_build:tiny_model'" in capsys.readouterr().err


def test_a_rerun_with_nothing_new_repairs_missing_and_stale_indexes(tmp_path, capsys):
    from hoverlay.stores.index import read_index_meta

    first, later = str(tmp_path / "first"), str(tmp_path / "later")
    write_generated_images(first, 3, seed=1)
    write_generated_images(later, 3, seed=2)
    store = str(tmp_path / "s")
    assert main(["build", "--images", first, "--store", store, "-q", *TINY[:-1]]) == 0
    # a build that commits and dies before extending the indexes leaves them covering 3 of 6
    assert main(["build", "--images", later, "--store", store, "-q", "--no-index"]) == 0
    os.remove(os.path.join(store, "index", "3.json"))  # and one index is lost altogether
    assert read_index_meta(store, "1").images_indexed == 3
    capsys.readouterr()
    assert main(["build", "--images", later, "--store", store, "-q"]) == 0
    assert "added 0 images" in capsys.readouterr().err
    reader = open_store(store)
    for layer in ("1", "3"):
        meta = read_index_meta(store, layer)
        assert meta.images_indexed == 6 and meta.ntotal == 6 * reader.geometry(layer).patches_per_image


# ===================================================================================== info
def test_info_json_is_the_text_facts_as_one_document(tmp_path, images, capsys):
    import json

    from hoverlay.stores import FORMAT_VERSION
    from hoverlay.stores.index import read_index_meta

    Path(images, "gen", "broken.png").write_bytes(b"not a png")  # one failed image
    store = str(tmp_path / "s")
    assert main(["build", "--images", images, "--store", store, "-q", *TINY[:-1]]) == 0  # with indexes
    r = run_cli("info", "--json", store)  # a fresh interpreter, as a script would run it
    assert r.returncode == 0, r.stderr
    assert "NaN" not in r.stdout  # strict JSON: a measurement not taken is null
    facts = json.loads(r.stdout)
    reader = open_store(store)
    assert facts["store"] == reader.url
    assert facts["format"] == {"name": "hoverlay", "version": FORMAT_VERSION,
                               "tool_version": reader.attrs.tool_version}
    assert facts["model"] == reader.model and facts["model"]["spec"] == "python:test_build:tiny_model"
    assert facts["preprocessing"] == reader.attrs.preprocessing
    assert facts["image_size"] == 64 and facts["chunk"] == reader.attrs.chunk
    assert facts["images"] == {"committed": 7, "ok": 6, "failed": 1}
    assert facts["created"] == reader.attrs.created and facts["updated"] == reader.attrs.updated
    assert facts["labels"] == {"gen": 6} and facts["size_bytes"] > 0
    assert list(facts["layers"]) == ["1", "3"]
    for name, layer in facts["layers"].items():
        g, meta = reader.geometry(name), read_index_meta(store, name)
        assert (layer["height"], layer["width"], layer["dim"]) == (g.height, g.width, g.dim)
        index = layer["index"]
        assert index["factory"] == meta.factory and index["ntotal"] == 6 * g.patches_per_image
        assert index["images_indexed"] == 7 and index["stale"] is False
        assert index["file_bytes"] == os.path.getsize(os.path.join(store, "index", f"{name}.faiss"))
        assert index["recall"]["k"] == meta.recall.k and index["recall"]["queries"] == meta.recall.queries

    capsys.readouterr()
    assert main(["info", store]) == 0  # the text says the same
    text = capsys.readouterr().out
    assert "7 committed (6 ok, 1 failed)" in text and f"{facts['size_bytes'] / 1e6:.1f} MB on disk" in text
    for name, layer in facts["layers"].items():
        assert f"  {name:<24} H={layer['height']:<3} W={layer['width']:<3} D={layer['dim']:<5} index " \
               f"{layer['index']['factory']} ntotal={layer['index']['ntotal']}" in text
    assert "labels     gen (6)" in text

    more = str(tmp_path / "more")
    write_generated_images(more, 2, seed=8)
    assert main(["build", "--images", more, "--store", store, "-q", "--no-index"]) == 0
    capsys.readouterr()
    assert main(["info", "--json", store, store]) == 0  # several stores: an array of them
    both = json.loads(capsys.readouterr().out)
    assert isinstance(both, list) and len(both) == 2 and both[0] == both[1]
    assert both[0]["images"]["committed"] == 9
    assert all(layer["index"]["stale"] and layer["index"]["images_indexed"] == 7
               for layer in both[0]["layers"].values())


# ===================================================================================== URLs
def test_file_urls_round_trip(tmp_path, images, capsys):
    url = "file://" + str(tmp_path / "s")
    assert main(["build", "--images", "file://" + images, "--store", url, "-q", *TINY]) == 0
    assert main(["info", url]) == 0
    assert "6 committed" in capsys.readouterr().out
    assert open_store(url).n_images == open_store(tmp_path / "s").n_images == 6
    assert main(["build", "--images", images, "--store", url, "-q"]) == 0  # rerun: nothing new
    assert "added 0 images" in capsys.readouterr().err


def test_a_missing_filesystem_package_names_the_extra(tmp_path):
    blocked = "import sys\nsys.modules['s3fs'] = None  # as if s3fs were not installed\n"
    code = blocked + ("from hoverlay.cli import main\n"
                      "raise SystemExit(main(['info', 's3://bucket/store']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == EXIT_INPUT
    assert r.stderr.strip() == ("hoverlay info: s3:// URLs need the package s3fs, which is not installed: "
                                "pip install 'hoverlay[s3]'")
    code = blocked + ("from hoverlay.cli import main\n"
                      f"raise SystemExit(main(['build', '--images', {str(tmp_path)!r}, '--store', 's3://b/s']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == EXIT_INPUT and "hoverlay[s3]" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("info", "nosuchfs://bucket/store")
    assert r.returncode == EXIT_INPUT and "unknown URL scheme 'nosuchfs'" in r.stderr


def test_a_serve_only_install_is_told_to_install_the_build_extra(tmp_path, images):
    code = ("import sys\nsys.modules['torch'] = None  # as in `pip install hoverlay` (no [build])\n"
            "from hoverlay.cli import main\n"
            f"raise SystemExit(main(['build', '--images', {images!r}, '--store', {str(tmp_path / 's')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == EXIT_INPUT and "Traceback" not in r.stderr
    assert r.stderr.strip() == "hoverlay build: needs the package torch, which is not installed: pip install 'hoverlay[build]'"
    assert not (tmp_path / "s").exists()


def test_storage_options_must_be_a_json_object(tmp_path, capsys):
    assert main(["info", str(tmp_path), "--storage-options", "[1, 2]"]) == EXIT_USAGE
    assert "is not a JSON object" in capsys.readouterr().err


# ================================================================== progress and the summary
def test_progress_on_a_non_terminal_is_periodic_lines_with_counts(tmp_path):
    src = str(tmp_path / "images")
    write_generated_images(src, 12, seed=4)
    r = run_cli("build", "--images", src, "--store", str(tmp_path / "s"), "--batch-size", "4",
                "--chunk", "12", "--progress-interval", "0", *TINY[:-1])
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr  # no redraws in a log
    embedding = [line for line in r.stderr.splitlines() if line.startswith("embedding:")]
    counts = [int(re.match(r"embedding: (\d+)/12 images", line)[1]) for line in embedding]
    assert counts[:3] == [4, 8, 12]  # per forward batch (one partition of 12), not per wave
    assert all("images/s" in line and "ETA" in line for line in embedding)
    assert any(line.startswith("hashing:") for line in r.stderr.splitlines())
    for phase in ("adding to the index", "1: adding", "3: adding"):
        assert phase in r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith("added 12 images") and "embedding" in summary and "images/s" in summary


def test_quiet_keeps_the_summary(tmp_path, images):
    r = run_cli("build", "--images", images, "--store", str(tmp_path / "s"), "--quiet", *TINY)
    assert r.returncode == 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("added 6 images (0 failed)")
    rate = float(re.search(r"embedding ([0-9.]+) images/s \(([0-9.]+)s\)", lines[0])[1])
    assert rate > 0


def test_an_unreachable_scheduler_is_one_line_and_creates_no_store(tmp_path, images, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = tmp_path / "s"
    assert main(["build", "--images", images, "--store", str(store), "--scheduler",
                 f"tcp://127.0.0.1:{port}", *TINY]) == EXIT_INPUT
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not (store / "zarr.json").exists()


def test_a_local_cluster_prints_its_dashboard(tmp_path, images, capsys):
    summary = build(images, str(tmp_path / "s"), scheduler="processes", workers=1, **TINY_KW)
    assert summary.dashboard and summary.dashboard.startswith("http://")
    assert f"Dask dashboard: {summary.dashboard}" in capsys.readouterr().err
    assert open_store(tmp_path / "s").n_images == 6


# ============================================================================ documentation
def test_the_readme_documents_every_exit_code_and_build_flag():
    readme = (ROOT / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| `{code}` | {meaning} |" in readme, code
    for row in BUILD_OPTIONS.table():
        assert row in readme, row


def test_nothing_outside_stores_imports_its_private_modules():
    import ast

    offenders = []
    for folder in ("pipeline", "explorer", "hoverlay", "tests", "bench", "notebooks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if any(re.match(r"(hoverlay\.)?stores\._", n) for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    # and nothing imports the old top-level names that would shadow (or be shadowed by) others
    for folder in ("stores", "pipeline", "explorer", "hoverlay", "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import) (stores|pipeline|explorer)\b", text, re.M), path


def test_numbers_of_the_option_kinds():
    from hoverlay.options import ByteSize, Integer, Number, Switch, TextList

    assert ByteSize().from_value("1.5GiB") == int(1.5 * 2**30) and ByteSize().from_text("512M") == 512 * 10**6
    assert Integer().from_text(" 7 ") == 7 and Switch().from_text("off") is False
    assert TextList().from_value(["a", " b "]) == ["a", "b"]
    assert Number().from_value(1) == 1.0
    for kind, bad in [(Integer(), True), (Integer(), 2.5), (ByteSize(), -1), (TextList(), ","),
                      (Number(), float("nan"))]:
        with pytest.raises(ValueError):
            kind.from_value(bad)
    assert np.isfinite(Number().from_value(1e-3))


@pytest.mark.parametrize("value", ["lots", "-5", "1.5X"])
def test_a_bad_read_cache_size_is_refused_before_the_server_starts(tmp_path, value, capsys):
    assert main(["serve", str(tmp_path / "no-store"), f"--read-cache={value}"]) == 2
    err = capsys.readouterr().err
    assert f"--read-cache: {value!r} is not a size in bytes" in err and "Traceback" not in err, err
    assert not (tmp_path / "no-store").exists()
