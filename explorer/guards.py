"""The server's own routes, hardened: components behind login, a cheap liveness, slow logins.

Panel adds three routes that a public deployment cannot keep as they are:

* ``/components/<module>/…`` imports *any* named Python module to find a component's files, and
  asks for no login. :class:`GuardedComponentHandler` serves only the modules of the packages
  the explorer is made of (:data:`COMPONENT_PACKAGES`), and only to a logged-in user when the
  server has a login;
* ``/liveness?endpoint=/`` builds a whole session (seconds of CPU) for anyone who asks.
  :class:`CheapLivenessHandler` answers whether the endpoint is served without building one: a
  health check needs no login and must stay cheap;
* ``/ws`` lets any logged-in user join any session whose token they hold: the token is signed,
  but says nothing of the user. :class:`UserBoundWSHandler` compares the user of the page request
  that made the token (its signed ``user`` cookie travels in the token's payload) with the user
  who connects, and refuses a mismatch: a leaked token is useless to another account;
* the basic-auth login form accepts any number of wrong passwords at full speed.
  :class:`ThrottledLoginHandler` delays every failure and locks a client or a user name out
  for a while after :data:`LoginPolicy.attempts` failures in :data:`LoginPolicy.window` seconds.

:func:`install` puts them in place of Panel's before ``pn.serve`` builds its routes (Panel looks
these classes up by module attribute when it builds them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import tornado.escape
from bokeh.protocol.exceptions import ProtocolError
from bokeh.util.token import check_token_signature, get_token_payload
from panel.auth import BasicLoginHandler
from panel.io.liveness import LivenessHandler
from panel.io.server import AuthenticatedStaticFileHandler, ComponentResourceHandler, WSHandler
from tornado.web import HTTPError, authenticated, decode_signed_value

#: Packages whose components' resources ``/components/`` may serve.
COMPONENT_PACKAGES = ("panel", "panel_material_ui", "bokeh", "holoviews", "hoverlay")


def component_module_allowed(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in COMPONENT_PACKAGES)


class GuardedComponentHandler(ComponentResourceHandler):
    """Panel's component resource route, limited to the explorer's packages and behind login."""

    get_login_url = AuthenticatedStaticFileHandler.get_login_url
    get_current_user = AuthenticatedStaticFileHandler.get_current_user
    prepare = AuthenticatedStaticFileHandler.prepare

    def parse_url_path(self, path: str) -> str:
        module = path.split("/", 1)[0]
        if not component_module_allowed(module):
            raise HTTPError(404, "Module not found")  # never imported
        return str(super().parse_url_path(path))

    @authenticated
    async def get(self, path: str, include_body: bool = True) -> None:
        await super().get(path, include_body)


class CheapLivenessHandler(LivenessHandler):
    """``/liveness[?endpoint=/]``: whether the server (or that endpoint) is up, building nothing."""

    async def get(self) -> None:
        endpoint = self.get_argument("endpoint", default=None)
        self.set_header("Content-Type", "application/json")
        if endpoint is not None and endpoint not in self.applications:
            raise HTTPError(400, "no such endpoint")
        self.write({endpoint if endpoint is not None else self.request.path: True})


class UserBoundWSHandler(WSHandler):
    """Panel's websocket handler; with a login, only the user who opened a session may join it."""

    def open(self) -> None:
        token = getattr(self, "_token", None)
        if token is not None and self.application.auth_provider.get_user is not None and \
                check_token_signature(token, signed=self.application.sign_sessions,
                                      secret_key=self.application.secret_key):
            owner = _signed_user(self, get_token_payload(token).get("cookies", {}).get("user"))
            current = self.current_user
            current = current.decode() if isinstance(current, bytes) else current
            if owner is None or owner != current:
                self.close()
                raise ProtocolError("this session belongs to another user")
        super().open()


def _signed_user(handler: Any, value: str | None) -> str | None:
    """The user name in a signed ``user`` cookie value, or None when absent or forged."""
    if not value:
        return None
    secret = handler.application.settings.get("cookie_secret")
    raw = decode_signed_value(secret, "user", value) if secret else None
    return raw.decode() if isinstance(raw, bytes) else raw


@dataclass
class LoginPolicy:
    """Failed-login limits, per client address and per user name alike."""

    attempts: int = 5        # failures allowed in the window before a lockout
    window: float = 300.0    # seconds over which failures count
    delay: float = 1.0       # seconds every failed attempt waits before its answer


class LoginThrottle:
    """Counts failed logins per key (``ip:…``, ``user:…``) in a sliding window."""

    def __init__(self, policy: LoginPolicy):
        self.policy = policy
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures[key]
        while q and now - q[0] > self.policy.window:
            q.popleft()
        return q

    def locked_for(self, keys: list[str], now: float | None = None) -> float:
        """Seconds until every key may try again (0: not locked)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waits = [self.policy.window - (now - q[0]) for k in keys
                     if len(q := self._recent(k, now)) >= self.policy.attempts]
        return max(waits, default=0.0)

    def failed(self, keys: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)


#: The process's throttle (set by :func:`install`).
THROTTLE = LoginThrottle(LoginPolicy())


class ThrottledLoginHandler(BasicLoginHandler):
    """Panel's basic-auth login form, with failures delayed and locked out (see the module)."""

    async def post(self) -> None:  # type: ignore[override]
        username = self.get_argument("username", "")
        keys = [f"ip:{self.request.remote_ip}", f"user:{username}"]
        wait = THROTTLE.locked_for(keys)
        if wait > 0:
            self.set_status(429)
            self.set_header("Retry-After", str(int(wait) + 1))
            self.write(f"Too many failed logins; try again in {int(wait) + 1} s.")
            return
        if self._validate(username, self.get_argument("password", "")):
            THROTTLE.succeeded(keys)
            super().post()  # Panel's own: sets the user cookie and redirects to where the user was going
            return
        THROTTLE.failed(keys)
        await asyncio.sleep(THROTTLE.policy.delay)
        self.redirect(self.request.uri + "?error=" + tornado.escape.url_escape("Invalid username or password!"))


def install(policy: LoginPolicy | None = None) -> None:
    """Put the guarded handlers in place of Panel's (before ``pn.serve``)."""
    import panel.auth
    import panel.io.server

    global THROTTLE
    THROTTLE = LoginThrottle(policy or LoginPolicy())
    panel.io.server.ComponentResourceHandler = GuardedComponentHandler  # type: ignore[misc]
    patterns = panel.io.server.per_app_patterns  # Bokeh's list, which Panel filled in place
    patterns[:] = [(route, UserBoundWSHandler if route == r"/ws" else handler) for route, handler in patterns]
    panel.io.server.LivenessHandler = CheapLivenessHandler  # type: ignore[misc]
    panel.auth.BasicLoginHandler = ThrottledLoginHandler  # type: ignore[misc]


__all__ = ["CheapLivenessHandler", "GuardedComponentHandler", "LoginPolicy", "LoginThrottle",
           "ThrottledLoginHandler", "UserBoundWSHandler", "install"]
