"""The explorer's server as deployed: real server processes on 127.0.0.1, real stores, no mocks.

Sessions are driven by :class:`bench.wsclient.BokehSession`, a websocket client that speaks the
Bokeh protocol the way the page's JavaScript does (20 Chromium pages do not fit two cores; the
server cannot tell the difference). Three servers start together when the module starts:

- ``main``: ``python -m explorer.serve`` over stores A (default; "fine" indexed, "coarse" not),
  B (index stale) and C (appended to while serving), checking for commits every 0.5 s and
  discarding a closed session after 2 s;
- ``auth``: ``hoverlay serve`` (``python -m hoverlay``) with basic auth, a URL prefix and two
  forked processes;
- ``plain``: ``panel serve explorer/app_module.py`` with the stores in ``HOVERLAY_STORE``.

The servers run the server hover path (``--browser-hover-budget 0``: every patch change is a
message and the server draws the maps), the one these clients time; the browser path, where the
server only hears rests and clicks, is tested in tests/ui and tests/test_explorer_app.py.

Every server writes its log to a file, and tests that must not provoke errors read the part of
the log written while they ran. Heavier variants (more sessions, longer runs, many kills) are in
``bench/serving.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.servers import Server, free_port, launch  # noqa: E402
from bench.serving import SAVER, hover_like_a_user, percentiles  # noqa: E402
from bench.wsclient import BokehSession, SessionRefused  # noqa: E402
from hoverlay.stores import LayerGeometry, PatchIndex, StoreWriter, open_store  # noqa: E402
from hoverlay.stores.errors import StoreError  # noqa: E402
from hoverlay.stores.synthetic import clustered_activations, make_synthetic_store, synthetic_pixels  # noqa: E402

pytestmark = pytest.mark.slow

S = 64
LAYERS = {"fine": LayerGeometry(8, 8, 16), "coarse": LayerGeometry(4, 4, 32)}
PAGE_SIZE, K = 8, 5
#: The hover path these websocket clients time: the server one (see the module docstring).
SERVER_PATH = ("--browser-hover-budget", "0")
# Bokeh discards a session 2-2.5 s after its page closed (instead of 15-32 s, the default for
# users), so that the overload test sees the memory of its sessions released soon; a session
# must connect its websocket within that long of its page load, which every client here does
# (the overload test opens its sessions two at a time, none waits behind 20 others being built).
SHORT_SESSION_LIFETIME = ("--check-unused-sessions", "500", "--unused-session-lifetime", "2000")
PASSWD = "root:x:0:0"  # what /etc/passwd starts with: it must never reach a client
USERS = {"alice": "correct horse battery"}


# ============================================================================ stores
def _index(url: str, layer: str, images: int) -> None:
    """An exact FAISS index over the first ``images`` images of a layer."""
    r = open_store(url)
    g = r.geometry(layer)
    vecs = r.vectors(layer, slice(0, images)).reshape(-1, g.dim).astype(np.float32)
    index = PatchIndex.create(g.dim, "IDMap,Flat")
    index.add(vecs, np.arange(len(vecs), dtype=np.int64))
    index.meta.images_indexed = images
    index.save(url, layer)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("serving")
    out = {}
    for name, n, seed in (("a", 64, 0), ("b", 24, 3), ("c", 32, 5), ("unserved", 8, 7)):
        out[name] = str(base / name)
        make_synthetic_store(out[name], n, layers=LAYERS, image_size=S, chunk=8, seed=seed,
                             labels=("cat", "dog"))
    _index(out["a"], "fine", 64)  # fresh; "coarse" of A has none (missing)
    _index(out["b"], "fine", 16)  # covers 16 of 24 images: stale
    return out


# =========================================================================== servers
def errors_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]


@pytest.fixture(scope="module")
def servers(stores, tmp_path_factory):
    """Start the three servers at once (they start in parallel; tests wait for the one they use)."""
    logs = tmp_path_factory.mktemp("logs")
    users = logs / "users.json"
    users.write_text(json.dumps(USERS))
    main_port, auth_port, plain_port = free_port(), free_port(), free_port()
    py = sys.executable
    out = {
        "main": launch("main", [py, "-m", "hoverlay.explorer.serve", stores["a"], stores["b"], stores["c"],
                                "--port", str(main_port), "--page-size", str(PAGE_SIZE), "-k", str(K),
                                "--reload-interval", "0.5", *SERVER_PATH, *SHORT_SESSION_LIFETIME],
                       f"http://127.0.0.1:{main_port}/", logs),
        "auth": launch("auth", [py, "-m", "hoverlay", "serve", stores["a"], "--port", str(auth_port),
                                "--basic-auth", str(users), "--prefix", "hv", "--num-procs", "2",
                                "--page-size", str(PAGE_SIZE), *SERVER_PATH],
                       f"http://127.0.0.1:{auth_port}/hv/", logs,
                       env={"PANEL_COOKIE_SECRET": secrets.token_urlsafe(24)}),
        "plain": launch("plain", [py, "-m", "panel", "serve", "explorer/app_module.py", "--port", str(plain_port),
                                  "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{plain_port}",
                                  "--liveness"],
                        f"http://127.0.0.1:{plain_port}/", logs,
                        env={"HOVERLAY_STORE": os.pathsep.join([stores["a"], stores["b"]]),
                             "HOVERLAY_BROWSER_HOVER_BUDGET": "0"}),
    }
    yield out
    for server in out.values():
        server.stop()


@pytest.fixture(scope="module")
def main(servers) -> Server:
    return servers["main"].wait()


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def session(url: str, query: str = "", **kw) -> AsyncIterator[BokehSession]:
    """A session opened like a page load (``BokehSession.open``), closed however the block ends."""
    s = await BokehSession.open(url, query, **kw)
    try:
        yield s
    finally:
        await s.close()


def text(session: BokehSession) -> str:
    """All prose of the client's document, unescaped (Panel escapes Markdown/HTML panes' text)."""
    return html.unescape(html.unescape(session.texts()))


def page_info(session: BokehSession) -> str:
    m = re.search(r"page (?:<strong>)?(\d+)(?:</strong>)? / (\d+) · (\d+) images", text(session))
    return m.group(0) if m else ""


def n_images(session: BokehSession) -> int:
    m = re.search(r"· (\d+) images", text(session))
    return int(m.group(1)) if m else -1


def expected_maps(url: str, layer: str, ids: list[int], image: int, y: int, x: int) -> np.ndarray:
    """Independent float64 cosine maps of the page's images to one stored patch."""
    r = open_store(url)
    q = r.vectors(layer, image)[y, x].astype(np.float64)
    return np.einsum("nhwd,d->nhw", r.vectors(layer, np.asarray(ids)).astype(np.float64), q)


async def use_store(session: BokehSession, url: str, images: int) -> None:
    """Switch a session to another served store with the store selector, as a user would (it
    offers display names, never server paths)."""
    session.change(session.widget("Store"), "value", os.path.basename(url))
    await session.wait_for(lambda: n_images(session) == images, 20)


async def rest_and_topk(session: BokehSession, tile: int, y: int, x: int) -> str:
    """Hover a patch and let the pointer rest: the top-k heading for that patch."""
    await session.hover(tile, y, x)
    image = session.page_image_ids()[tile]
    await session.wait_for(lambda: f"closest to #{image} ({y},{x})" in text(session), 20)
    return next(line for line in text(session).splitlines() if f"closest to #{image} ({y},{x})" in line)


# ================================================================================ CLI
def test_hoverlay_serve_passes_server_options_to_panel(tmp_path):
    from hoverlay.cli import command_parser
    from hoverlay.explorer.serve import (
        ServeConfigError,
        check_auth,
        server_options,
        split_store_list,
    )

    users = tmp_path / "users.json"
    users.write_text(json.dumps(USERS))
    args = command_parser("serve").parse_args(["s1", "s2", "--port", "0", "--num-procs", "3", "--prefix", "hv",
                                "--allow-websocket-origin", "example.org", "--basic-auth", str(users),
                                "--cookie-secret", "x" * 32, "--admin", "--reload-interval", "5",
                                "--check-unused-sessions", "500", "--unused-session-lifetime", "2000"])
    assert args.stores == ["s1", "s2"] and args.reload_interval == 5
    assert server_options(args) == {"prefix": "hv", "basic_auth": str(users), "cookie_secret": "x" * 32,
                                    "websocket_origin": ["example.org"], "num_procs": 3, "admin": True,
                                    "login_attempts": 5, "login_window": 300.0, "login_delay": 1.0,
                                    "check_unused_sessions_milliseconds": 500,
                                    "unused_session_lifetime_milliseconds": 2000}
    defaults = server_options(command_parser("serve").parse_args(["s"]))
    assert not {"check_unused_sessions_milliseconds", "unused_session_lifetime_milliseconds"} & set(defaults)
    with pytest.raises(ServeConfigError, match="--login-attempts must be >= 1"):
        server_options(command_parser("serve").parse_args(["s", "--login-attempts", "0"]))
    with pytest.raises(ServeConfigError, match="--unused-session-lifetime must be > 0"):
        server_options(command_parser("serve").parse_args(["s", "--unused-session-lifetime", "0"]))
    oauth = command_parser("serve").parse_args(["s", "--oauth-provider", "github", "--oauth-key", "k",
                                 "--oauth-secret", "s", "--oauth-extra-params", '{"scope": "read"}'])
    opts = server_options(oauth)
    assert opts["oauth_provider"] == "github" and opts["oauth_extra_params"] == {"scope": "read"}
    check_auth(opts)
    assert opts["cookie_secret"]  # drawn when none is given: logins need signed cookies
    # options that would fail open or late are refused up front
    for bad, message in [({"basic_auth": str(tmp_path / "typo.json")}, "does not exist"),
                         ({"basic_auth": str(tmp_path)}, "not readable"),
                         ({"basic_auth": str(users), "oauth_provider": "github"}, "not both"),
                         ({"oauth_provider": "github"}, "needs oauth_key and oauth_secret")]:
        with pytest.raises(ServeConfigError, match=message):
            check_auth(dict(bad))
    (tmp_path / "list.json").write_text('["alice"]')
    with pytest.raises(ServeConfigError, match="must hold"):
        check_auth({"basic_auth": str(tmp_path / "list.json")})
    assert split_store_list(os.pathsep.join(["/d/a", "s3://bucket/b", "/d/c"])) == ["/d/a", "s3://bucket/b", "/d/c"]
    assert split_store_list("/d/a,/d/b") == ["/d/a", "/d/b"]


# ====================================================================== liveness, selector
def test_liveness_and_the_store_selector(main, stores):
    assert json.loads(urllib.request.urlopen(main.url + "liveness", timeout=10).read()) == {"/liveness": True}

    async def go():
        async with session(main.url) as s:
            options = [o[0] if isinstance(o, list) else o for o in s.widget("Store").attributes["options"]]
            assert options == ["a", "b", "c"]  # display names: the browser never sees server paths
            assert n_images(s) == 64
            await use_store(s, stores["b"], 24)
            assert s.page_image_ids() == list(range(PAGE_SIZE))
            await s.hover(3, 2, 5)  # tile 3 of page 1 is image 3
            want = expected_maps(stores["b"], "fine", s.page_image_ids(), 3, 2, 5)
            np.testing.assert_allclose(s.tile_maps("fine", S), want, atol=2e-3)

    run(go())


def test_the_first_document_holds_the_grid_and_the_views_below_it_join_once_it_is_drawn(main):
    """The pulled document has the sidebar, the grid and the query view but not the top-k panels
    or the pair view; ``document_ready`` (what BokehJS sends once it has drawn the page) brings
    them (the twenty-session test below has their rests answered)."""
    def topk_cards(s: BokehSession) -> list:
        return list(s.find(lambda m: m.attributes.get("class_name") == "TopKCards"))

    async def go():
        async with session(main.url) as s:  # open() sends document_ready last; nothing read since
            assert s.named("grid-rgb") and s.widget("Store") is not None
            assert topk_cards(s) == []
            await s.wait_for(lambda: len(topk_cards(s)) == 2)  # A's panel and B's

    run(go())


# ====================================================================== build while serving
def _append(writer: StoreWriter, start: int, n: int, seed: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    acts = {name: clustered_activations(rng, (n, g.height, g.width, g.dim)) for name, g in writer.layers.items()}
    pixels = synthetic_pixels(rng, n, S)
    return acts, pixels


def test_build_while_serving_shows_only_commits_and_picks_them_up(main, stores):
    url, before, added = stores["c"], 32, 16
    mark = main.mark()

    async def go():
        async with session(main.url) as s:
            await use_store(s, url, before)
            writer = StoreWriter.open(url)
            start = writer.reserve(added)
            acts, pixels = _append(writer, start, added, seed=11)
            rows = [{"source": f"new://{i}", "label": "new", "hash": f"new-{i}"} for i in range(added)]
            steps = [lambda: writer.write_block(start, pixels[:8], {k: v[:8] for k, v in acts.items()}),
                     lambda: (writer.write_block(start + 8, pixels[8:], {k: v[8:] for k, v in acts.items()}),
                              writer.write_table(start, rows))]
            for n_step, step in enumerate(steps):  # reserved + half written; all written: not committed
                step()
                for i in range(2):  # across several reload checks (every 0.5 s)
                    await s.hover(i + 2 * n_step, i + 1, 2)
                    await asyncio.sleep(0.3)
                assert n_images(s) == before, page_info(s)
                if n_step == 0:
                    async with session(main.url) as late:  # a session opened mid-build
                        await use_store(late, url, before)
            writer.commit(start + added)
            t = time.perf_counter()
            await s.wait_for(lambda: n_images(s) == before + added, 10)
            picked_up = time.perf_counter() - t
            # the new images are reachable in the running session: last page, real data
            for _ in range((before + added) // PAGE_SIZE - 1):
                ids = s.page_image_ids()
                s.click(s.button("next ▶"))
                await s.wait_for(lambda ids=ids: s.page_image_ids() != ids, 10)
            ids = s.page_image_ids()
            assert ids == list(range(before + added - PAGE_SIZE, before + added))
            await s.hover(5, 6, 1)
            np.testing.assert_allclose(s.tile_maps("fine", S), expected_maps(url, "fine", ids, ids[5], 6, 1), atol=2e-3)
            head = await rest_and_topk(s, 5, 6, 2)
            assert "exact" in head  # C has no index: the scan covers the new images
            return picked_up

    picked_up = run(go())
    print(f"\nnew commit visible in a running session after {picked_up:.2f} s (checks every 0.5 s)")
    assert not errors_in(main.log(mark)), main.log(mark)


# =============================================================================== faults
def test_missing_or_stale_index_falls_back_to_exact_search_with_a_warning(main, stores):
    mark = main.mark()

    async def go():
        async with session(main.url, "?layer=coarse") as s:
            head = await rest_and_topk(s, 2, 1, 3)
            assert "exact scan" in head and "no index for layer 'coarse'" in text(s)
            await use_store(s, stores["b"], 24)  # a store switch starts on its first layer again
            head = await rest_and_topk(s, 4, 5, 6)
            # the index answers for its 16 images, an exact scan for the 8 it lacks
            assert "index + exact scan of the newer images" in head
            assert "covers 16 of 24 images (stale): the 8 newer ones are searched exactly" in text(s)

    run(go())
    assert not errors_in(main.log(mark)), main.log(mark)




def test_sigkill_during_index_save_leaves_a_loadable_index(tmp_path):
    """A build killed while it writes an index: what it leaves is the old or the new index; a
    kill between the .faiss and the .json rename is the documented "stale" state (exact search)."""
    url, n = str(tmp_path / "store"), 200_000  # 51 MB of float32: each save takes a while
    outcomes = []
    for round_ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, url, str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saved"
        for _ in range(2 + round_):  # land the kill in a later save
            assert proc.stdout.readline().startswith("saving")
        time.sleep(random.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            index = PatchIndex.load(url, "l")
        except StoreError as exc:  # crash between the two renames: detected, never misread
            assert "stale" in str(exc)
            outcomes.append("stale")
            continue
        assert index.ntotal in (n // 2, n) and index.meta.ntotal == index.ntotal
        assert index.meta.images_indexed == index.ntotal
        probe = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)[index.ntotal - 1]
        _, ids = index.search(probe, 1)
        assert ids[0][0] == index.ntotal - 1  # the vectors are the ones saved, not a torn file
        outcomes.append(index.ntotal)
    print(f"\nafter kill -9 during save: {outcomes}")


# ========================================================================= bad requests
# Opening a session costs ~1 s of server CPU, so two bad URLs open sessions and the rest reach the
# same validation through the session's Location model, as a page changing its URL does.
BAD_URLS = [("?layer=../../etc/passwd", "unknown layer '../../etc/passwd'"), ("?query=-1,0,0", "image -1 is outside")]
BAD_SEARCHES = [
    ("?query=0,-3,2", "y -3 is outside"),
    ("?query=4,2,8", "x 8 is outside"),
    ("?query=a,b,c&store=/etc/passwd&file=../../etc/passwd", "query 'a,b,c' is not 'image,y,x' with integers"),
    ("?query=1,2", "query '1,2' is not 'image,y,x'"),
    ("?page=-4", "page=-4"),  # Panel parses it as -4.0 here, which the app rejects as not an integer
    ("?page=abc", "bad URL value page='abc'"),
    ("?page=99999999999999999999999", "99999999999999999999999"),
    ("?function=/etc/passwd", "unknown similarity function '/etc/passwd'"),
    ("?layer=" + "x" * 5000, "unknown layer 'xxxx"),
    # several bad values at once (one of the wrong type): every one is reported, not just the last
    ("?layer=bogus&page=abc&function=manhattan",
     ("unknown layer 'bogus'", "bad URL value page='abc'", "unknown similarity function 'manhattan'")),
]


def test_bad_url_state_shows_a_message_and_the_server_keeps_serving(main, stores):
    async def check(s: BokehSession, query: str, says: str | tuple[str, ...]) -> None:
        wanted = (says,) if isinstance(says, str) else says
        try:
            await s.wait_for(lambda: all(w in s.message() for w in wanted), 10)
        except asyncio.TimeoutError:
            raise AssertionError(f"{query}: expected {says!r} in the message, got {s.message()!r}") from None
        assert n_images(s) == 64, query  # still store A: no path from the URL is ever opened
        assert PASSWD not in text(s)

    async def go():
        for query, says in BAD_URLS:
            async with session(main.url, query) as s:
                await check(s, query, says)
                await s.hover(1, 2, 3)  # and the session works
        async with session(main.url) as s:
            location = next(s.find(lambda m: m.type.endswith(".Location")))
            for query, says in BAD_SEARCHES:
                s.change(location, "search", query)
                await check(s, query, says)
            s.change(location, "search", "?layer=fine&query=&page=1&function=cosine")
            await s.wait_for(lambda: s.page_image_ids() == list(range(PAGE_SIZE)), 10)
            await asyncio.sleep(0.3)
            await s.hover(2, 4, 6)
            want = expected_maps(stores["a"], "fine", list(range(PAGE_SIZE)), 2, 4, 6)
            np.testing.assert_allclose(s.tile_maps("fine", S), want, atol=2e-3)

    run(go())
    assert json.loads(urllib.request.urlopen(main.url + "liveness", timeout=10).read()) == {"/liveness": True}


def test_a_coordinate_beyond_int64_shows_a_message(main):
    async def go():
        async with session(main.url, "?query=99999999999999999999,0,0") as s:
            await s.wait_for(lambda: bool(s.message()), 2)
            await s.hover(1, 2, 3, timeout=2)

    run(go())


def test_malformed_client_updates_are_refused_with_a_message(main, stores):
    async def go():
        async with session(main.url) as s:
            ids = s.overlay_ids()
            for junk in [{"y": [-1, -1]}, {"y": [1000, 1000]}, {"tile": [10**12] * 2}, {"tile": ["a", "a"]},
                         {"x": [None, None]}, {"click": [1.5, 1.5]}, {"tile": []}]:
                seen = len(s.updates)
                row = {"fig": ["fine", "coarse"], "tile": [1, 1], "y": [2, 2], "x": [3, 3], "cx": [0, 0],
                       "cy": [0, 0], "w": [1, 1], "h": [1, 1], "click": [0, 0], **junk}
                s.change(s.by_name("grid-pointer"), "data", row)
                await asyncio.sleep(0.3)
                assert not any(u.models & ids for u in s.updates[seen:]), f"{junk} moved the overlays"
            for title, value, says in [("Page size", 10**9, "page_size' must be at most 64"),
                                       ("Page size", -5, "page_size' must be at least 1"),
                                       ("k", 10**9, "ExplorerState.k' must be at most 64"),
                                       ("Columns", 0, "ncols' must be at least 1"),
                                       ("Store", "/etc/passwd", "/etc/passwd not in list"),
                                       ("Store", "../../etc/passwd", "../../etc/passwd not in list"),
                                       ("Store", stores["unserved"], f"{stores['unserved']} not in list")]:
                s.change(s.widget(title), "value", value)
                await s.wait_for(lambda says=says: says in s.message(), 10)
                assert "ignored an invalid update" in s.message()
                assert n_images(s) == 64 and s.page_image_ids() == list(range(PAGE_SIZE)), (title, value)
            assert PASSWD not in text(s)
            await s.hover(2, 3, 4)
            want = expected_maps(stores["a"], "fine", list(range(PAGE_SIZE)), 2, 3, 4)
            np.testing.assert_allclose(s.tile_maps("fine", S), want, atol=2e-3)

    run(go())


TRAVERSALS = ["../../etc/passwd", "/etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "file:///etc/passwd",
              "%2e%2e/%2e%2e/%2e%2e/etc/passwd"]


def test_no_file_path_is_ever_taken_from_the_client(main, stores):
    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(main.url.rstrip("/") + path, timeout=20) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    leaks = []
    paths = [f"/{t}" for t in TRAVERSALS] + [f"/static/{t}" for t in TRAVERSALS] + \
            [f"/static/extensions/panel/{t}" for t in TRAVERSALS] + [f"/components/{t}" for t in TRAVERSALS] + \
            ["/?" + "&".join(f"{p}={urllib.parse.quote(t, safe='')}" for p in
                             ("layer", "query", "page", "function", "store", "file")) for t in TRAVERSALS[:2]] + \
            ["/autoload.js?bokeh-absolute-url=file:///etc/passwd"]
    for path in paths:
        status, body = get(path)
        if PASSWD.encode() in body:
            leaks.append((path, status))
    assert not leaks
    assert get("/liveness")[0] == 200  # still serving

    async def go():  # the same through the websocket: the store is chosen from a fixed list only
        async with session(main.url) as s:
            for t in TRAVERSALS + ["/etc", stores["unserved"]]:
                s.change(s.widget("Store"), "value", t)
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)
            assert n_images(s) == 64 and PASSWD not in text(s)

    run(go())


# ================================================================================= auth
def test_basic_auth_gives_no_page_and_no_data_without_a_login(servers, stores):
    auth = servers["auth"].wait()
    opener = urllib.request.build_opener(NoRedirect)
    for path in ("", "?query=1,2,3", "autoload.js?bokeh-autoload-element=x&bokeh-absolute-url=" + auth.url):
        resp = opener.open(auth.url + path, timeout=20)
        body = resp.read().decode(errors="replace")
        assert resp.status == 302 and "login?next=%2Fhv%2F" in resp.headers["Location"], (path, resp.status)
        assert "token" not in body and "images" not in body
    assert json.loads(urllib.request.urlopen(auth.url + "liveness", timeout=10).read()) == {"/hv/liveness": True}

    async def go():
        from bokeh.util.token import generate_jwt_token, generate_session_id

        with pytest.raises(SessionRefused):  # a forged session token, no login cookie
            await BokehSession.connect(auth.url, generate_jwt_token(generate_session_id()))
        with pytest.raises(SessionRefused):  # a wrong password gives no cookie
            await BokehSession.open(auth.url, cookies=login(auth.url, "alice", "wrong"))
        # the positive control: logged in, the same server serves the store
        async with session(auth.url, cookies=login(auth.url, "alice", USERS["alice"])) as s:
            assert n_images(s) == 64
            await s.hover(1, 1, 1)

    run(go())
    workers = auth.workers()
    assert len(workers) == 2  # --num-procs 2
    auth.stop()  # SIGTERM to the first process only: the workers it forked stop with it
    for worker in workers:
        worker.wait(timeout=10)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None

    def http_error_302(self, req, fp, code, msg, headers):
        return fp


def login(base: str, user: str, password: str) -> dict[str, str]:
    """POST the login form like a browser; the signed cookies it sets (none for a wrong password)."""
    opener = urllib.request.build_opener(NoRedirect)
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    resp = opener.open(urllib.request.Request(base + "login", data=data), timeout=20)
    jar = {}
    for raw in resp.headers.get_all("Set-Cookie") or []:
        name, _, rest = raw.partition("=")
        jar[name] = rest.split(";")[0]
    return {k: v for k, v in jar.items() if k in ("user", "id_token")}


# =========================================================================== panel serve
def test_plain_panel_serve_of_the_app_module(servers, stores):
    plain = servers["plain"].wait()
    assert urllib.request.urlopen(plain.url + "liveness", timeout=10).status == 200

    async def go():
        async with session(plain.url + "app_module") as s:
            options = [o[0] if isinstance(o, list) else o for o in s.widget("Store").attributes["options"]]
            assert options == ["a", "b"]
            await s.hover(2, 3, 1)
            want = expected_maps(stores["a"], "fine", list(range(16)), 2, 3, 1)
            np.testing.assert_allclose(s.tile_maps("fine", S), want, atol=2e-3)

    run(go())
    assert not errors_in(plain.log()), plain.log()


# ======================================================================= overload (#17)
N_SESSIONS = 20
# Every session moves over a new patch 15 times a second for 30 s without a pause (a pointer
# crossing 14 px cells at ~200 px/s, as in a browser), then rests (layer view and top-k): the
# issue's overload. On the server path each move is one write of the pointer source.
RATE, HOVER_S = 15.0, 30.0
LOAD = {"strokes": 1, "moves": int(RATE * HOVER_S), "rate": RATE, "rest": 0.6}
OPENING = 2  # sessions opening at once (see the main server's session lifetime)
# Every session's last move is drawn within this long of it: the bound, asserted as such.
# Measured on the project's 2-core machine beside its neighbours' work (11 runs): last move -> its
# overlays max 0.26-0.58 s, also with two CPU-bound processes running beside the test (0.47 s);
# every move -> the first overlays after it p50 53-98 ms, p99 0.36-0.88 s, max 0.58-1.13 s.
# Before the server dropped superseded moves, 30 s of this input took 20-50 s more to drain.
LAST_ANSWER_S = 2.0
DRAIN = 20.0  # the clients wait at most this long for it (and the top-k), so that a miss is reported
# The server's RSS comes back within 10% of what it was after a warm-up session had come and gone
# (it fills the process-wide caches: store readers, indexes, stats): measured +3-4% (139 -> 144-145
# MB; 150-152 -> 156-158 MB after the module's other tests); on Python's own allocator, which `hoverlay
# serve` does not run on, it stayed +50%, whatever the wait (see
# explorer.serve.use_system_allocator). Closed sessions are discarded 2-2.5 s after they close (the
# main server's session lifetime), their memory released 1 s later.
RSS_BACK = 1.10
RELEASE_WAIT_S = 15.0  # at most this long after the sessions closed


def wait_released(server: Server, since: int, timeout: float) -> re.Match[str]:
    """The server's log line saying it released the memory of closed sessions and none is live."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(r"memory of \d+ closed session\(s\) released: 0 live, RSS (\d+) MB", server.log(since))
        if found or time.monotonic() > deadline:
            assert found, f"no release of the closed sessions' memory logged:\n{server.log(since)[-3000:]}"
            return found
        time.sleep(0.2)


@pytest.mark.serial
def test_twenty_sessions_hover_at_once(main, stores):
    """The issue's overload (#17): 20 sessions each move 15 times a second for 30 s; every
    session's last move is drawn within 2 s of it, and once they have closed the server's RSS is
    back within 10% of what it was after a warm-up session."""
    import psutil

    mark = main.mark()
    server = psutil.Process(main.proc.pid)

    async def warm_up():  # the process-wide caches (readers, indexes, stats, search) fill with a first session
        async with session(main.url) as s:
            await rest_and_topk(s, 1, 1, 1)

    t0 = time.perf_counter()
    run(warm_up())
    wait_released(main, main.mark(), RELEASE_WAIT_S)  # "0 live" is logged once the warm-up session is gone too
    rss_before, after_warm_up = server.memory_info().rss, main.mark()

    async def go():
        t = time.perf_counter()
        gate = asyncio.Semaphore(OPENING)

        async def open_one() -> BokehSession:
            async with gate:
                return await BokehSession.open(main.url)

        sessions = await asyncio.gather(*(open_one() for _ in range(N_SESSIONS)))
        opened = time.perf_counter() - t

        async def user(i: int, s: BokehSession):
            await asyncio.sleep(random.Random(i).uniform(0, 1.0))  # users do not start in step
            return await hover_like_a_user(s, i, drain=DRAIN, **LOAD)

        try:
            t = time.perf_counter()
            runs = await asyncio.gather(*(user(i, s) for i, s in enumerate(sessions)))
            hovering = time.perf_counter() - t
            return runs, opened, hovering, [s.tile_maps("fine", S) for s in sessions]
        finally:
            await asyncio.gather(*(s.close() for s in sessions))

    runs, opened, hovering, final = run(go())
    closed = time.perf_counter()
    wait_released(main, after_warm_up, RELEASE_WAIT_S)
    rss_after = server.memory_info().rss
    while rss_after > RSS_BACK * rss_before and time.perf_counter() - closed < RELEASE_WAIT_S:
        time.sleep(0.25)
        rss_after = server.memory_info().rss
    back = time.perf_counter() - closed

    p = percentiles(runs)
    finals = [r.final_answer for r in runs]
    worst = max(x if x is not None else float("inf") for x in finals)
    print(f"\n{N_SESSIONS} sessions opened in {opened:.1f} s, {OPENING} at a time; each sent {len(runs[0].sent)} "
          f"moves in {np.mean([r.sent[-1] - r.sent[0] for r in runs]):.1f} s, hovering took {hovering:.1f} s in all; "
          f"{np.mean([len(r.got) for r in runs]):.0f} draws per session (superseded moves are dropped)\n"
          f"move -> the first overlays after it: p50 {p['p50_ms']:.0f} ms, p95 {p['p95_ms']:.0f} ms, "
          f"p99 {p['p99_ms']:.0f} ms, max {p['max_ms']:.0f} ms; last move -> its overlays: max {worst:.2f} s\n"
          f"server RSS {rss_before / 2**20:.0f} MB after the warm-up, {rss_after / 2**20:.0f} MB {back:.1f} s after "
          f"the sessions closed; the test took {time.perf_counter() - t0:.0f} s")
    assert not errors_in(main.log(mark)), main.log(mark)
    for i, r in enumerate(runs):
        assert len(r.sent) == LOAD["moves"] and r.sent[-1] - r.sent[0] <= HOVER_S + 0.5, (i, r.sent[-1] - r.sent[0])
        # the latest move wins: superseded moves may be dropped, the last one is drawn in time
        assert r.final_answer is not None and r.final_answer <= LAST_ANSWER_S, (i, r.final_answer)
        tile, y, x = r.cells[-1]
        ids = list(range(PAGE_SIZE))
        np.testing.assert_allclose(final[i], expected_maps(stores["a"], "fine", ids, ids[tile], y, x), atol=2e-3,
                                   err_msg=f"session {i} shows overlays of another patch than its last")
        assert r.topk, f"session {i} never got its top-k"
    assert rss_after <= RSS_BACK * rss_before, (rss_before / 2**20, rss_after / 2**20)
