"""``s3://`` stores through ``--storage-options``, against a real S3-compatible server.

The server is moto's standalone server (the one s3fs's own tests use) on 127.0.0.1, shared by
the session's S3 tests (conftest ``s3_server``); the client side is the real s3fs. Credentials
come from the environment, as s3fs reads them; only the endpoint travels in
``--storage-options``.
"""

from __future__ import annotations

import json

import pytest
from conftest import write_generated_images

from hoverlay.cli import main
from hoverlay.stores import open_store

pytest.importorskip("s3fs")
TINY = ["--model", "python:test_build:tiny_model", "--layers", "3", "--size", "64"]  # one layer: fewer requests


def test_build_info_serve_and_append_on_s3(s3_server, tmp_path, capsys):
    endpoint, bucket = s3_server.endpoint, "hoverlay"
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
    assert reader.n_images == 9 and reader.layers == ["3"]
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
