"""``s3://`` stores through ``--storage-options``, against a real S3-compatible server.

The server is moto's standalone server (the one s3fs's own tests use) on 127.0.0.1, started
for this module; the client side is the real s3fs. Credentials come from the environment, as
s3fs reads them; only the endpoint travels in ``--storage-options``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import write_generated_images

from hoverlay.cli import main
from hoverlay.stores import open_store

pytest.importorskip("s3fs")
TINY = ["--model", "python:test_build:tiny_model", "--layers", "1,3", "--size", "64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint URL, bucket) of a moto server on 127.0.0.1, stopped after the module."""
    server = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(server):
        pytest.skip("moto[server] is not installed")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("moto server did not start")
                time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("hoverlay")
        yield endpoint, "hoverlay"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_build_info_serve_and_append_on_s3(s3, tmp_path, capsys):
    endpoint, bucket = s3
    options = json.dumps({"endpoint_url": endpoint})
    url = f"s3://{bucket}/photos.zarr"
    images = str(tmp_path / "images")
    write_generated_images(images, 6, seed=1)
    assert main(["build", "--images", images, "--store", url, "--storage-options", options, "-q", *TINY]) == 0
    assert "now has 6 images" in capsys.readouterr().err
    assert main(["info", url, "--storage-options", options]) == 0
    out = capsys.readouterr().out
    assert "6 committed (6 ok" in out and "index IDMap,Flat" in out and "recall@10=1.000" in out
    # a second, incremental build: the store gives model and layers, the index is extended
    write_generated_images(images, 3, seed=2, label="more")
    assert main(["build", "--images", images, "--store", url, "--storage-options", options, "-q"]) == 0
    assert "added 3 images" in capsys.readouterr().err
    reader = open_store(url, storage_options={"endpoint_url": endpoint})
    assert reader.n_images == 9 and reader.layers == ["1", "3"]
    from hoverlay.stores.search import LayerSearch

    search = LayerSearch(reader, "3")
    assert search.index is not None and search.index.meta.images_indexed == 9 and search.warning is None
    top = search.search(search.query_vector(7, 1, 1), 64)
    best = top.ids[top.scores >= top.scores[0] - 1e-3]  # the tiny model's patches can tie exactly
    assert abs(top.scores[0] - 1) < 1e-2 and reader.patch_id("3", 7, 1, 1) in best
    # the explorer opens the store with the same options and builds a session on it
    from hoverlay.explorer.serve import serve, session_factory

    serve([url], port=0, start=False, storage_options={"endpoint_url": endpoint})
    session = session_factory([url], {}, 0)()
    assert session is not None
    # without the endpoint the store is not reachable: one line, no traceback
    assert main(["info", f"s3://{bucket}/nope.zarr", "--storage-options", options]) == 4
    assert "is not a hoverlay store" in capsys.readouterr().err
