"""The flags of ``hoverlay serve`` (and ``python -m hoverlay.explorer.serve``), standard library only.

Kept apart from :mod:`hoverlay.explorer.serve` so that the command line can parse (and answer
``--help``) without importing Panel and Bokeh; the server itself imports them when it starts.
"""

from __future__ import annotations

import argparse

from hoverlay.options import STORAGE_OPTIONS, ByteSize

#: Default of ``--browser-hover-budget`` (hoverlay.explorer.browser_hover uses the same number).
DEFAULT_BROWSER_HOVER_BUDGET = "32M"


#: Default of ``--read-cache``: decoded image rows each store's reader keeps (~270 images of the
#: default model's three layers with their pixels).
DEFAULT_READ_CACHE = "256M"


def browser_hover_budget(text: str) -> int:
    """``--browser-hover-budget``: a size such as 32M, or 0 for the server path always."""
    if text.strip() == "0":
        return 0
    try:
        return ByteSize().from_value(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes such as 32M, or 0") from None

def read_cache_bytes(text: str) -> int:
    """``--read-cache``: a size such as 256M, or 0 for none."""
    return browser_hover_budget(text)


def upload_bytes(text: str) -> int:
    """``--upload-max-bytes``: a size such as 32M."""
    try:
        return ByteSize().from_value(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes such as 32M") from None


#: Seconds between checks for new commits (hoverlay.explorer.reload uses it as its default).
DEFAULT_RELOAD_INTERVAL = 2.0

#: argparse destinations passed to ``pn.serve`` under the same name when given.
SERVER_ARGUMENTS = ("prefix", "basic_auth", "oauth_provider", "oauth_key", "oauth_secret",
                    "oauth_redirect_uri", "oauth_encryption_key", "cookie_secret")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``hoverlay serve STORE [STORE ...]``."""
    parser.add_argument("stores", nargs="+", metavar="STORE", help="store path(s) or fsspec URL(s)")
    parser.add_argument(STORAGE_OPTIONS.flag, default=None, metavar=STORAGE_OPTIONS.metavar,
                        help=STORAGE_OPTIONS.argparse_help)
    parser.add_argument("--port", type=int, default=5006, help="port (0: any free port; default 5006)")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--show", action="store_true", help="open a browser tab")
    parser.add_argument("--allow-websocket-origin", action="append", default=None, metavar="HOST[:PORT]",
                        help="extra websocket origins allowed (when serving beyond localhost)")
    parser.add_argument("--layer", default=None, help="layer the pointer snaps to at start")
    parser.add_argument("--page-size", type=int, default=None, help="images per page (default 16)")
    parser.add_argument("--ncols", type=int, default=None, help="tiles per row (default 4)")
    parser.add_argument("--tile-px", type=int, default=None, help="tile size in pixels (default 110)")
    parser.add_argument("-k", "--k", type=int, default=None, help="top-k neighbours shown (default 8)")
    parser.add_argument("--cmap", default=None, help="overlay colour map (default viridis)")
    parser.add_argument("--browser-hover-budget", type=browser_hover_budget, default=None, metavar="BYTES",
                        help="pages whose shown layers' vectors fit in BYTES are hovered in the browser, "
                             "with no message per pointer move; larger pages, or 0, use the server "
                             f"(default {DEFAULT_BROWSER_HOVER_BUDGET})")
    parser.add_argument("--read-cache", type=read_cache_bytes, default=None, metavar="BYTES",
                        help="decoded image rows (vectors, norms, pixels) each store keeps in memory for "
                             "re-reads: a pointer rest reads images its page was just sent, and sessions "
                             f"share them; 0: none (default {DEFAULT_READ_CACHE})")
    parser.add_argument("--no-live-topk", dest="live_topk", action="store_false", default=None,
                        help="search top-k only on pin / button, not whenever the pointer rests "
                             "(for large stores without an index)")
    srv = parser.add_argument_group("server (passed to Panel's server)")
    srv.add_argument("--login-attempts", type=int, default=5, metavar="N",
                     help="failed logins (per client address and per user name) before a lockout (default 5)")
    srv.add_argument("--login-window", type=float, default=300.0, metavar="SECONDS",
                     help="seconds over which failed logins count, and the lockout's length (default 300)")
    srv.add_argument("--login-delay", type=float, default=1.0, metavar="SECONDS",
                     help="seconds each failed login waits before its answer (default 1)")
    srv.add_argument("--num-procs", type=int, default=1, metavar="N",
                     help="worker processes forked after the stores are opened (0: one per CPU); "
                          "a browser session lives in one process, so a proxy in front must be sticky")
    srv.add_argument("--prefix", default=None, help="URL prefix, e.g. 'hoverlay' behind a proxy at /hoverlay/")
    srv.add_argument("--admin", action="store_true", help="Panel's admin page at /admin (behind the same auth)")
    srv.add_argument("--check-unused-sessions", type=int, default=None, metavar="MS",
                     help="how often closed sessions are looked for, in milliseconds (Bokeh's default 17000)")
    srv.add_argument("--unused-session-lifetime", type=int, default=None, metavar="MS",
                     help="how long a session is kept after its page closed, in milliseconds, before its "
                          "memory is freed (Bokeh's default 15000)")
    srv.add_argument("--reload-interval", type=float, default=DEFAULT_RELOAD_INTERVAL, metavar="SECONDS",
                     help=f"check for new commits every SECONDS (0: never; default {DEFAULT_RELOAD_INTERVAL:g})")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="server log level (default info)")
    qry = parser.add_argument_group("queries with any image (a model worker process embeds uploads; "
                                    "this process never imports torch)")
    qry.add_argument("--query-worker-start", action="store_true",
                     help="start the model worker with the server, not on the first upload")
    qry.add_argument("--query-timeout", type=float, default=None, metavar="SECONDS",
                     help="seconds an upload may take to be embedded, worker start and model load "
                          "included (default 30)")
    qry.add_argument("--query-queue", type=int, default=None, metavar="N",
                     help="uploads waiting for the worker at most; more are refused as busy (default 8)")
    qry.add_argument("--query-threads", type=int, default=None, metavar="N",
                     help="torch threads of the model worker (default: torch's, every core)")
    qry.add_argument("--upload-max-bytes", type=upload_bytes, default=None, metavar="BYTES",
                     help="largest upload, e.g. 32M (default 32 MiB)")
    qry.add_argument("--upload-max-pixels", type=int, default=None, metavar="PX",
                     help="most pixels an upload may declare (decompression bombs; default 64000000)")
    qry.add_argument("--query-folder", action="append", default=None, metavar="DIR",
                     help="a server folder whose images may be given by path as queries (repeatable; "
                          "none by default: never an arbitrary path)")
    auth = parser.add_argument_group("authentication (Panel's; secrets are best given as environment "
                                     "variables PANEL_COOKIE_SECRET, PANEL_OAUTH_KEY, PANEL_OAUTH_SECRET)")
    auth.add_argument("--basic-auth", metavar="FILE", default=None,
                      help='JSON file {"user": "password", ...}: a login page guards the app')
    auth.add_argument("--oauth-provider", default=None,
                      help="OAuth provider (github, google, azure, okta, generic, ...; see Panel's docs)")
    auth.add_argument("--oauth-key", default=None, help="OAuth client id")
    auth.add_argument("--oauth-secret", default=None, help="OAuth client secret")
    auth.add_argument("--oauth-redirect-uri", default=None, help="OAuth redirect URI (behind a proxy)")
    auth.add_argument("--oauth-extra-params", default=None, metavar="JSON",
                      help="extra provider parameters as a JSON object")
    auth.add_argument("--oauth-encryption-key", default=None, help="key encrypting OAuth tokens in cookies")
    auth.add_argument("--cookie-secret", default=None,
                      help="secret signing login cookies (default: PANEL_COOKIE_SECRET, else random per start)")
    return parser

