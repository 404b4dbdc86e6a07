"""The browser never sees a server path: stores by display name, damage reported without files."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import CHROMIUM

pytestmark = pytest.mark.ui

pytest.importorskip("playwright.sync_api")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402
from test_explorer_ui import FINE, S, hover_cell, open_app  # noqa: E402  (puts the repository on sys.path)

from bench.servers import serve_explorer  # noqa: E402

SECRET = "srv-private-7f3a"  # a folder name that must never reach the browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from hoverlay.stores import LayerGeometry
    from hoverlay.stores.synthetic import make_synthetic_store

    root = tmp_path_factory.mktemp("ui-paths") / SECRET
    urls = [str(root / name) for name in ("photos", "scans")]
    for k, url in enumerate(urls):
        make_synthetic_store(url, 8, layers={"fine": LayerGeometry(*FINE, 16)}, image_size=S, chunk=4, seed=k)
    # a damaged shard: its images are "unreadable" tiles, the exact top-k scan fails on them
    os.remove(os.path.join(urls[0], "layers", "fine", "vectors", "c", "1", "0", "0", "0"))
    server = serve_explorer(urls, "--page-size", "8", "--ncols", "4", "-k", "4", "--tile-px", "90",
                            log_dir=tmp_path_factory.mktemp("logs"), timeout=60)
    yield server.url
    server.stop()


def test_no_server_path_in_the_page_or_any_frame(browser, server):
    page = browser.new_page(viewport={"width": 1500, "height": 1200})
    page.set_default_timeout(20_000)
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(
        payload if isinstance(payload, str) else payload.decode("utf-8", "replace"))))
    try:
        open_app(page, server)
        hover_cell(page, 1, (1, 1))  # a rest: the top-k search meets the damaged shard
        alert = page.locator(".hoverlay-message")
        expect(alert).to_contain_text("some images of this store are damaged")
        store = page.locator("select").first  # the store selector, by display name
        assert store.locator("option").all_inner_texts() == ["photos", "scans"]
        text = alert.inner_text() + page.content() + "".join(frames)
        leaks = [text[max(0, i - 150):i + 60] for i in _find_all(text, SECRET)]
        assert frames and not leaks, leaks[:3]
        assert "/tmp/" not in text
        labels = page.evaluate("() => Bokeh.documents[0].get_model_by_name('grid-labels').data.text")
        assert labels[4:8] == [f"#{i} unreadable" for i in range(4, 8)]
    finally:
        page.close()


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out
