"""The server's own routes against a real server with a login: components behind login and
limited to the explorer's packages, a liveness that builds no session, slow and limited logins."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.servers import free_port, launch  # noqa: E402
from hoverlay.stores import LayerGeometry  # noqa: E402
from hoverlay.stores.synthetic import make_synthetic_store  # noqa: E402

USERS = {"alice": "correct horse battery", "bob": "tr0ub4dor"}
ATTEMPTS, DELAY = 3, 0.3
PROBE = "hoverlay_probe_module"  # a module on the server's path that records being imported


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None

    def http_error_302(self, req, fp, code, msg, headers):
        return fp


OPENER = urllib.request.build_opener(NoRedirect)


def get(url: str, cookies: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Cookie": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())})
    try:
        resp = OPENER.open(req, timeout=20)
        return resp.status, resp.read().decode(errors="replace"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)


def post_login(base: str, user: str, password: str) -> tuple[int, dict[str, str], float]:
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    t0 = time.perf_counter()
    try:
        resp = OPENER.open(urllib.request.Request(base + "login", data=data), timeout=20)
        status, headers = resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    jar = {}
    for raw in headers.get_all("Set-Cookie") or []:
        name, _, rest = raw.partition("=")
        jar[name] = rest.split(";")[0]
    return status, {k: v for k, v in jar.items() if k in ("user", "id_token")}, time.perf_counter() - t0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    store = str(root / "store")
    make_synthetic_store(store, 8, layers={"l": LayerGeometry(2, 2, 8)}, image_size=16, chunk=4)
    users = root / "users.json"
    users.write_text(json.dumps(USERS))
    probe_dir = root / "path"
    probe_dir.mkdir()
    marker = root / "imported"
    (probe_dir / f"{PROBE}.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\nclass C:\n    __css__ = []\n")
    port = free_port()
    srv = launch("guards", [sys.executable, "-m", "hoverlay", "serve", store, "--port", str(port),
                            "--basic-auth", str(users), "--login-attempts", str(ATTEMPTS),
                            "--login-window", "60", "--login-delay", str(DELAY)],
                 f"http://127.0.0.1:{port}/", root,
                 env={"PANEL_COOKIE_SECRET": secrets.token_urlsafe(24),
                      "PYTHONPATH": os.pathsep.join([str(probe_dir), os.environ.get("PYTHONPATH", "")])})
    srv.wait(90)
    yield srv, marker
    srv.stop()


def test_components_route_imports_no_outside_module_and_needs_a_login(server):
    srv, marker = server
    status, _, _ = get(srv.url + f"components/{PROBE}/C/__css__/x.css")
    assert status in (302, 404) and not marker.exists()  # never imported, logged in or not
    _, cookies, _ = post_login(srv.url, "alice", USERS["alice"])
    status, _, _ = get(srv.url + f"components/{PROBE}/C/__css__/x.css", cookies)
    assert status == 404 and not marker.exists()
    # the explorer's own packages are served only after a login
    path = "components/panel.models.reactive_html/ReactiveHTML/__css__/x.css"
    status, _, headers = get(srv.url + path)
    assert status == 302 and "login" in headers.get("Location", "")
    status, _, _ = get(srv.url + path, cookies)
    assert status != 302  # past the login (404: no such file)


def test_liveness_builds_no_session(server):
    srv, _ = server
    t0 = time.perf_counter()
    for _ in range(10):
        status, body, _ = get(srv.url + "liveness?endpoint=/")
        assert status == 200 and json.loads(body) == {"/": True}
    assert time.perf_counter() - t0 < 2.0  # a session takes ~0.5 s to build: ten would take 5 s
    assert get(srv.url + "liveness?endpoint=/nope")[0] == 400


def test_a_session_token_joins_only_the_session_of_its_user(server):
    import asyncio

    from bench.wsclient import BokehSession, SessionRefused

    srv, _ = server
    alice = post_login(srv.url, "alice", USERS["alice"])[1]
    bob = post_login(srv.url, "bob", USERS["bob"])[1]
    assert alice and bob

    async def go():
        mine = await BokehSession.open(srv.url, cookies=alice)
        try:
            with pytest.raises(SessionRefused):  # bob holding alice's token: refused
                await BokehSession.connect(srv.url, mine.token, cookies=bob)
            again = await BokehSession.connect(srv.url, mine.token, cookies=alice)  # her second tab
            await again.close()
        finally:
            await mine.close()

    asyncio.run(go())


def test_failed_logins_are_slow_then_locked_out_per_client_and_user(server):
    srv, _ = server
    for _ in range(ATTEMPTS):
        status, cookies, took = post_login(srv.url, "bob", "guess")
        assert status == 302 and not cookies and took >= DELAY * 0.9
    status, cookies, took = post_login(srv.url, "bob", USERS["bob"])  # right, but locked out now
    assert status == 429 and not cookies and took < DELAY
    status, cookies, _ = post_login(srv.url, "alice", USERS["alice"])  # same client: locked too
    assert status == 429 and not cookies
