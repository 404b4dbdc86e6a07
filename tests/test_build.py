"""The Dask pipeline end to end on real files, real models and real Zarr stores."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_generated_images
from PIL import Image

from hoverlay.cli import main
from hoverlay.errors import EXIT_INPUT, EXIT_LOCKED
from hoverlay.pipeline.build import build
from hoverlay.stores import StoreLockedError, StoreMismatchError, UnknownLayerError, open_store
from hoverlay.stores.index import PatchIndex
from hoverlay.stores.lock import StoreLock

GOOGLENET = {"model": "torchvision:googlenet", "weights": "none", "layers": ["inception4d"]}


def assert_same_store(a: str, b: str, layers) -> None:
    ra, rb = open_store(a), open_store(b)
    assert ra.n_images == rb.n_images
    for col in ("source", "label", "hash", "status", "reason"):
        assert list(ra.table()[col]) == list(rb.table()[col]), col
    np.testing.assert_array_equal(ra.pixels(slice(None)), rb.pixels(slice(None)))
    for layer in layers:
        np.testing.assert_array_equal(ra.vectors(layer, slice(None)), rb.vectors(layer, slice(None)))
        np.testing.assert_array_equal(ra.norms(layer, slice(None)), rb.norms(layer, slice(None)))
        ia, ib = PatchIndex.load(a, layer), PatchIndex.load(b, layer)
        assert ia.ntotal == ib.ntotal == ra.table().ok.sum() * ra.geometry(layer).patches_per_image


def test_two_runs_equal_one_run(tmp_path):
    src = tmp_path / "src"
    write_generated_images(str(src), 5, seed=0)
    build(str(src), str(tmp_path / "inc"), chunk=4, quiet=True, **GOOGLENET)
    write_generated_images(str(src), 4, seed=1)  # names sort after the first batch
    s2 = build(str(src), str(tmp_path / "inc"), chunk=4, quiet=True, **GOOGLENET)
    assert (s2.added, s2.skipped) == (4, 5)
    build(str(src), str(tmp_path / "one"), chunk=4, quiet=True, **GOOGLENET)
    assert_same_store(str(tmp_path / "inc"), str(tmp_path / "one"), ["inception4d"])
    # a third run finds nothing to do
    s3 = build(str(src), str(tmp_path / "inc"), chunk=4, quiet=True, **GOOGLENET)
    assert (s3.added, s3.skipped) == (0, 9)


def _committed(store: str) -> int:
    try:
        with open(os.path.join(store, "zarr.json")) as f:
            return int(json.load(f)["attributes"]["hoverlay"]["committed"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return 0


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    src = tmp_path / "src"
    write_generated_images(str(src), 40, seed=3)
    args = ["--images", str(src), "--chunk", "2", "--workers", "1", "--batch-size", "2", "-q"]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "hoverlay", "build", "--store", killed, *args],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    deadline = time.time() + 120
    while _committed(killed) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = _committed(killed)
    assert 0 < at_kill < 40, f"kill landed at {at_kill} committed images; expected mid-run"
    assert open_store(killed).n_images == at_kill  # the last commit is readable
    assert main(["build", "--store", killed, *args]) == 0
    full = str(tmp_path / "full")
    assert main(["build", "--store", full, *args]) == 0
    assert_same_store(killed, full, open_store(full).layers)


def _write_bad_files(folder):
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "zero.png"), "wb").close()
    good = os.path.join(folder, "good.png")
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(good)
    data = open(good, "rb").read()
    open(os.path.join(folder, "truncated.png"), "wb").write(data[: len(data) // 2])
    open(os.path.join(folder, "text.jpg"), "w").write("this is not an image\n" * 10)
    Image.new("L", (3000, 3000)).save(os.path.join(folder, "bomb.png"))  # 9 Mpx, tiny file
    os.symlink(os.path.join(folder, "gone.png"), os.path.join(folder, "dangling.png"))
    open(os.path.join(folder, "README.txt"), "w").write("ignored: not an image extension")
    # odd but valid modes: all must become RGB and succeed
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(os.path.join(folder, "gray16.png"))
    Image.new("RGBA", (50, 70), (10, 200, 30, 128)).save(os.path.join(folder, "rgba.png"))
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(os.path.join(folder, "cmyk.jpg"))
    Image.new("P", (40, 40)).save(os.path.join(folder, "palette.gif"))


def test_bad_files_are_reported_and_the_run_goes_on(tmp_path, capsys):
    folder = str(tmp_path / "bad")
    _write_bad_files(folder)
    store = str(tmp_path / "s")
    summary = build(folder, store, chunk=4, max_pixels=4_000_000, **GOOGLENET)
    reasons = {os.path.basename(u): r for u, r in summary.failed}
    assert set(reasons) == {"zero.png", "truncated.png", "text.jpg", "bomb.png", "dangling.png"}
    assert "empty" in reasons["zero.png"]
    assert "truncated" in reasons["truncated.png"] or "corrupt" in reasons["truncated.png"]
    assert "not an image" in reasons["text.jpg"]
    assert "too large" in reasons["bomb.png"]
    assert "cannot read" in reasons["dangling.png"]
    assert summary.ignored == 1 and summary.added == 10
    err = capsys.readouterr().err
    assert "failed: " in err and "5 failed" in err
    table = open_store(store).table()
    assert int(table.ok.sum()) == 5 and set(table["reason"][~table.ok]) == set(reasons.values())
    index = PatchIndex.load(store, "inception4d")
    assert index.ntotal == 5 * 14 * 14  # failed images are not searchable


def test_distributed_cluster_gives_the_same_store(tmp_path):
    from distributed import LocalCluster

    src = str(tmp_path / "src")
    write_generated_images(src, 6, seed=5)
    build(src, str(tmp_path / "threads"), chunk=2, quiet=True, **GOOGLENET)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        build(src, str(tmp_path / "dist"), chunk=2, quiet=True, scheduler=cluster.scheduler_address,
              **GOOGLENET)
    assert_same_store(str(tmp_path / "threads"), str(tmp_path / "dist"), ["inception4d"])


def test_errors_before_any_work(tmp_path, generated_images):
    src = generated_images(2)
    with pytest.raises(UnknownLayerError, match="'nope'"):
        build(src, str(tmp_path / "s"), layers="nope", quiet=True)
    assert not os.path.exists(tmp_path / "s" / "zarr.json")
    build(src, str(tmp_path / "s"), quiet=True, index=False, **GOOGLENET)
    with pytest.raises(StoreMismatchError, match="inception4d"):
        build(src, str(tmp_path / "s"), model="torchvision:googlenet", weights="none",
              layers="inception5b", quiet=True)
    with pytest.raises(StoreMismatchError, match="efficientnet"):
        build(src, str(tmp_path / "s"), model="efficientnet-lite0", quiet=True)
    with StoreLock(str(tmp_path / "s")):
        with pytest.raises(StoreLockedError, match="another build"):
            build(src, str(tmp_path / "s"), quiet=True, **GOOGLENET)
        code = main(["build", "--images", src, "--store", str(tmp_path / "s"), "--model",
                     "torchvision:googlenet", "--weights", "none", "--layers", "inception4d"])
        assert code == EXIT_LOCKED
    assert main(["build", "--images", src, "--store", str(tmp_path / "t"), "--layers", "zzz"]) == EXIT_INPUT
    assert main(["build", "--images", str(tmp_path / "missing"), "--store", str(tmp_path / "t")]) == EXIT_INPUT


def test_config_file_and_flag_override(tmp_path, generated_images, capsys):
    src = generated_images(3)
    cfg = tmp_path / "nightly.toml"
    cfg.write_text(f'images = "{src}"\nstore = "{tmp_path / "cfg"}"\nmodel = "torchvision:googlenet"\n'
                   f'weights = "none"\nlayers = ["inception4d"]\nchunk = 2\nquiet = true\n')
    assert main(["build", "--config", str(cfg), "--chunk", "3"]) == 0
    r = open_store(tmp_path / "cfg")
    assert r.n_images == 3 and r.attrs.chunk == 3 and r.layers == ["inception4d"]
    bad = tmp_path / "bad.toml"
    bad.write_text('imagez = "x"\n')
    assert main(["build", "--config", str(bad)]) == 2
    assert "imagez" in capsys.readouterr().err


def test_info_and_layers_commands(demo_store, capsys):
    assert main(["info", demo_store]) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0" in out and "4 committed" in out and "H=14  W=14  D=672" in out
    assert "IDMap,Flat" in out and "MB on disk" in out
    assert main(["layers", "efficientnet-lite0"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines["_blocks.11._swish"].startswith("*") and "D=672 H=14 W=14  >=0" in lines["_blocks.11._swish"]
    assert not lines["_blocks.10.add"].startswith("*") and ">=0" not in lines["_blocks.10.add"]
    assert [n for n, line in lines.items() if line.startswith("*")] == [
        "_blocks.5._swish", "_blocks.11._swish", "_swish_1"]
    assert not any("static_padding" in n for n in lines)  # zero padding is no feature map
    assert "inputs" not in lines and "_fc" not in lines  # the raw input and the logits are no feature maps
    assert main(["layers", "efficientnet-lite0", "--all"]) == 0
    assert "_fc" in capsys.readouterr().out


def test_shipped_nightly_config_is_valid():
    from hoverlay.options import load_config
    from hoverlay.pipeline.options import BUILD_OPTIONS

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "deploy", "nightly.toml"), BUILD_OPTIONS)
    assert cfg["quiet"] is True and cfg["store"].endswith(".zarr")


# ===================================================================== out of space
def tiny_model():
    """A two-conv model (python:test_build:tiny_model) so a real build takes a second, not a minute."""
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 2, stride=2), nn.ReLU())


class SmallDisk:
    """Where a store runs out of space: a 6 MB tmpfs (needs root) or a ``quotamem://`` fsspec
    filesystem with a byte quota (needs nothing). ``fill(leave)`` leaves ``leave`` bytes free."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        if kind == "tmpfs":
            self.path = tmp_path / "disk"
            self.path.mkdir()
            mounted = shutil.which("mount") is not None and subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(self.path)], capture_output=True).returncode == 0
            if not mounted:
                pytest.skip("needs root to mount a small tmpfs; the quotamem:// case covers the same path")
            self.store = str(self.path / "store")
        else:
            import quota_fs

            self.fs = quota_fs.QuotaMemoryFileSystem()
            self.fs.store.clear()
            type(self.fs).quota = 1 << 62
            self.store = "quotamem://hoverlay/store"

    def fill(self, leave: int) -> None:
        if self.kind == "tmpfs":
            free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
            (self.path / "filler").write_bytes(b"\0" * (free - leave))
        else:
            type(self.fs).quota = self.fs.used() + leave

    def free_up(self) -> None:
        if self.kind == "tmpfs":
            (self.path / "filler").unlink()
        else:
            type(self.fs).quota = 1 << 62

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        else:
            self.fs.store.clear()


@pytest.mark.parametrize("kind", ["quotamem", "tmpfs"])
def test_out_of_space_fails_cleanly_and_a_later_build_resumes(tmp_path, kind):
    disk = SmallDisk(kind, tmp_path)
    try:
        images = tmp_path / "images"
        write_generated_images(str(images), 10, seed=1, label="first")
        model = {"model": f"python:{__name__}:tiny_model", "layers": ["1", "3"], "size": 64, "chunk": 4,
                 "batch_size": 4, "quiet": True, "index": False}
        assert build(str(images), disk.store, **model).committed == 10
        write_generated_images(str(images), 40, seed=2, label="second")
        disk.fill(leave=150_000)  # a few waves fit, then the disk is full
        with pytest.raises(OSError) as failure:
            build(str(images), disk.store, **model)
        assert failure.value.errno == 28  # ENOSPC, not something else
        r = open_store(disk.store)  # the last commit is intact: every committed row reads back
        committed = r.n_images
        assert 10 <= committed < 50
        assert list(r.table()["status"]) == ["ok"] * committed
        assert len(set(r.table()["hash"])) == committed
        assert r.pixels(slice(None)).shape == (committed, 64, 64, 3)
        for layer in ("1", "3"):
            assert np.isfinite(r.vectors(layer, slice(None)).astype(np.float32)).all()
        StoreLock(disk.store).acquire().release()  # the failed build released the store
        disk.free_up()
        summary = build(str(images), disk.store, **{**model, "index": True})
        assert summary.committed == 50 and summary.added == 50 - committed
        # the same rows as two builds that never ran out of space
        ref = str(tmp_path / "reference")
        # listed files keep their folder's label (the folder as the source would give none)
        build(sorted(str(p) for p in (images / "first").glob("*.png")), ref, **model)
        build(str(images), ref, **{**model, "index": True})
        assert_same_store(disk.store, ref, ["1", "3"])
    finally:
        disk.close()
