"""Serving the explorer: a Python function, argparse glue for ``hoverlay serve``, and ``-m``.

``serve()`` opens every store once in this process before the server starts, so a wrong path
fails at once with the store layer's message instead of in the first browser session; the
readers it opens are the ones the sessions share (``pn.state.as_cached``).

Everything about the server itself is Panel's (``pn.serve``): processes, URL prefix, websocket
origins, basic auth / OAuth, cookie secret, admin page, the ``/liveness`` endpoint (on by
default, for container health checks and load balancers). What is added here is checking the
options that fail *open* or late in Panel — a ``--basic-auth`` file that does not exist is taken
as the password itself; OAuth without a cookie secret fails at the first login — and wiring each
session to :mod:`explorer.reload` (new commits without a restart) and to
:func:`explorer.session.show_session_error` (a refused client update shows a message), serving
websockets with :class:`explorer.session.LatestPointerWins` (superseded pointer moves are
dropped under overload), and running ``hoverlay serve`` on the C allocator
(:func:`use_system_allocator`), so that the memory of closed sessions goes back to the system.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from hoverlay.errors import HoverlayError, UsageError
from hoverlay.options import FLAG, STORAGE_OPTIONS

from .options import DEFAULT_RELOAD_INTERVAL as DEFAULT_INTERVAL
from .options import SERVER_ARGUMENTS, add_serve_arguments
from .session import install_latest_pointer_wins, register_session, show_session_error
from .text import as_plain_markdown, client_message

if TYPE_CHECKING:
    import panel as pn

# Panel, Bokeh and the app are imported where they are used: ``hoverlay serve`` may restart its
# process first (see use_system_allocator), and should not import them twice.

log = logging.getLogger(__name__)


@cache
def app_options() -> frozenset[str]:
    """Keyword arguments of :func:`serve` that configure the app rather than the server."""
    from .state import OUTPUTS, ExplorerState

    return frozenset(name for name in ExplorerState.param if name not in ("name", "message", *OUTPUTS))


#: Environment variables Panel reads a cookie secret from (kept out of ``ps`` output).
COOKIE_SECRET_ENV = ("PANEL_COOKIE_SECRET", "BOKEH_COOKIE_SECRET")


class ServeConfigError(UsageError):
    """A server option that would fail open or late (bad auth file, OAuth without secrets)."""


def split_store_list(text: str) -> list[str]:
    """Store URLs from ``HOVERLAY_STORE``: separated by ``os.pathsep`` (or commas).

    On POSIX ``os.pathsep`` is ':', which also starts every fsspec URL's '://': a piece that
    begins with '//' is glued back to the scheme before it, so ``s3://a:/data/b`` is two stores.
    """
    pieces = [p for chunk in text.split(",") for p in chunk.split(os.pathsep)]
    out: list[str] = []
    for piece in pieces:
        if piece.startswith("//") and out and out[-1].isidentifier():
            out[-1] += ":" + piece
        elif piece.strip():
            out.append(piece.strip())
    return out


def attach_session(layout: pn.viewable.Viewable,
                   reload_interval: float = DEFAULT_INTERVAL) -> pn.viewable.Viewable:
    """Register a served session (messages, new commits); returns ``layout`` for chaining."""
    import panel as pn

    from .reload import watch_session

    app = getattr(layout, "app", None)
    state = getattr(app, "state", None)
    if state is not None and register_session(state, pn.state.curdoc) and reload_interval > 0:
        watch_session(state, reload_interval)
    return layout


def build_session(stores: list[str], options: dict[str, Any],
                  reload_interval: float = DEFAULT_INTERVAL) -> pn.viewable.Viewable:
    """One session's page (``hoverlay serve`` and ``panel serve app_module.py`` alike): the app,
    or — for a store that cannot be shown, e.g. a damaged one — one message, never a traceback."""
    import panel as pn

    from .app import create_app

    try:
        return attach_session(create_app(stores, **options), reload_interval)
    except HoverlayError as exc:
        log.error("cannot build a session of %s: %s", stores, exc)
        return pn.pane.Alert(as_plain_markdown(f"This page cannot be shown: {client_message(exc)}."),
                             alert_type="danger", css_classes=["hoverlay-message"])


def session_factory(stores: list[str], options: dict[str, Any],
                    reload_interval: float = DEFAULT_INTERVAL) -> Callable[[], pn.viewable.Viewable]:
    """A plain function building one session's page (``pn.serve`` treats a partial as an object)."""

    def explorer_session() -> pn.viewable.Viewable:
        return build_session(stores, options, reload_interval)

    return explorer_session


def check_auth(kw: dict[str, Any]) -> None:
    """Validate auth options in ``pn.serve`` keywords; default the cookie secret when needed.

    - ``basic_auth`` must name a JSON file ``{"user": "password", ...}``: Panel takes any string
      that is not a file as *the* password for every user name, so a typo in the path would
      serve the app behind the path text.
    - basic auth and OAuth both sign cookies: without a secret (argument or
      ``PANEL_COOKIE_SECRET``) one is drawn per start, valid for this server only (forked
      ``num_procs`` workers share it; separate servers behind a proxy need the same one).
    - OAuth needs a key and a secret (arguments or ``PANEL_OAUTH_KEY`` / ``PANEL_OAUTH_SECRET``).
    """
    basic, oauth = kw.get("basic_auth"), kw.get("oauth_provider")
    if basic and oauth:
        raise ServeConfigError("use either basic auth or an OAuth provider, not both")
    if basic:
        path = os.fspath(basic)
        try:
            with open(path, encoding="utf-8") as fh:
                users = json.load(fh)
        except FileNotFoundError:
            raise ServeConfigError(f"basic auth file {path!r} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ServeConfigError(f"basic auth file {path!r} is not readable JSON: {exc}") from None
        if not (isinstance(users, dict) and users
                and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in users.items())):
            raise ServeConfigError(f'basic auth file {path!r} must hold {{"user": "password", ...}}')
        kw["basic_auth"] = os.path.abspath(path)
    if oauth:
        missing = [name for name, env in (("oauth_key", "PANEL_OAUTH_KEY"), ("oauth_secret", "PANEL_OAUTH_SECRET"))
                   if not (kw.get(name) or os.environ.get(env))]
        if missing:
            raise ServeConfigError(f"OAuth provider {oauth!r} needs {' and '.join(missing)} "
                                   f"(argument or PANEL_{missing[0].upper()} environment variable)")
    if (basic or oauth) and not (kw.get("cookie_secret") or any(os.environ.get(e) for e in COOKIE_SECRET_ENV)):
        kw["cookie_secret"] = secrets.token_urlsafe(32)
        log.warning("no cookie secret given: drew one for this server; logins end when it restarts, "
                    "and servers behind one proxy need a shared --cookie-secret / PANEL_COOKIE_SECRET")


def stop_workers_with_supervisor() -> None:
    """Make SIGTERM / SIGINT to the first process stop the ``num_procs`` workers it forked.

    With ``num_procs > 1`` the first process only supervises (Tornado's ``fork_processes``: it
    waits for its workers and restarts crashed ones); a signal sent to it alone — ``kill PID``,
    a test harness, a process manager that signals one PID — ended it and left the workers
    serving, orphaned. Installed before the fork: in the supervisor the handler passes the
    signal on to its children and exits; in a worker (which Panel gives its own SIGINT handler)
    SIGTERM simply ends the process.
    """
    import signal

    import psutil

    supervisor = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != supervisor:
            raise SystemExit(128 + signum)
        for child in psutil.Process(supervisor).children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def warm_up(stores: list[str], options: dict[str, Any]) -> None:
    """Build one session's page for nobody before the server listens.

    The first session of a process pays every first use: importing the app's modules, Panel's
    and Bokeh's first models of each kind, the readers' first chunks. Measured on the project's
    2-core machine, the first session's page took ~1.0 s to build and later ones ~0.4 s; after
    this it is ~0.4 s too (and with ``hoverlay demo`` that first session is the one every new
    user sees). Panel keeps the page it built (its views registry, ~one page of vectors); the
    server's later pages are not affected. A store that cannot be shown is left to the real
    session, which shows its message. Not with ``num_procs`` > 1: the page starts worker threads
    (its next page read ahead), and a forked child would inherit their pool without the threads.
    """
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    from .app import create_app

    doc = Document()
    try:
        with set_curdoc(doc):
            doc.add_root(create_app(stores, **options).get_root(doc))
    except Exception as exc:  # the real session reports it, as a message
        log.info("warming up a session of %s failed (%s); the first session will show why", stores, exc)
        return
    for error in document_errors(doc):
        log.error("the explorer's page fails Bokeh's integrity check: %s", error)


def document_errors(doc: Any) -> list[str]:
    """Bokeh's integrity-check errors of a document (its warnings, e.g. an empty placeholder
    row, are not errors)."""
    from bokeh.core.validation.check import check_integrity

    return [f"{issue.name} ({issue.extra}): {issue.text}" for issue in check_integrity(doc.models).error]


def skip_session_validation() -> None:
    """No Bokeh integrity check of every session's document: ~40 ms of a ~0.4 s page build on the
    project's 2-core machine, for a check of the app's own code, which :func:`warm_up` runs once
    per start instead (and the tests on every page kind). ``BOKEH_VALIDATE_DOC`` set in the
    environment decides instead."""
    from bokeh.settings import settings

    if "BOKEH_VALIDATE_DOC" not in os.environ:
        settings.perform_document_validation.set_value(False)


def freeze_startup_heap() -> None:
    """Keep the objects that exist at startup out of every later garbage collection.

    The imports (Panel, Bokeh, HoloViews, zarr, FAISS) leave ~180k tracked objects, and each
    session adds ~22k; a full collection walks all of them on the event loop, i.e. in every
    session's hover path (measured 0.45 s for the startup heap alone on the project's 2-core
    machine, 0.5-1.2 s pauses with 20-40 sessions). Objects alive now live as long as the process,
    so freezing them costs nothing and also keeps their pages shared with ``num_procs`` workers.
    """
    gc.collect()
    gc.freeze()


def serve(stores: Sequence[str] | str, port: int = 0, address: str = "127.0.0.1", show: bool = False,
          reload_interval: float = DEFAULT_INTERVAL, storage_options: dict[str, Any] | None = None,
          **kw: Any) -> Any:
    """Serve the explorer on ``address:port`` (0: any free port) with ``pn.serve``.

    Keyword arguments naming :class:`~explorer.state.ExplorerState` parameters (``layer``,
    ``page_size``, ``k``, ``cmap``, ...) configure every session; the rest go to ``pn.serve``
    (``threaded``, ``start``, ``websocket_origin``, ``num_procs``, ``prefix``, ``basic_auth``,
    ``oauth_provider``, ``cookie_secret``, ``admin``, ``liveness``, ...). ``reload_interval``:
    seconds between checks for a new commit (0: never; see :mod:`explorer.reload`);
    ``storage_options``: fsspec options for remote stores (endpoint, credentials).
    Blocks unless ``threaded=True`` or ``start=False``; returns what ``pn.serve`` returns.
    """
    import panel as pn

    from .guards import LoginPolicy
    from .guards import install as install_guards
    from .query_worker import shared_worker
    from .resources import get_reader, set_storage_options

    urls = [stores] if isinstance(stores, str) else [str(s) for s in stores]
    if kw.get("threaded") and int(kw.get("num_procs") or 1) != 1:
        raise ServeConfigError("num_procs > 1 forks the server process: it cannot run threaded")
    check_auth(kw)
    for url in urls:
        set_storage_options(url, storage_options)
        get_reader(url)  # fail fast, and warm the per-process cache the sessions share
    options = {k: kw.pop(k) for k in list(kw) if k in app_options()}
    for folder in options.get("query_folders", []):
        if not os.path.isdir(folder):
            raise ServeConfigError(f"--query-folder {folder!r} is not a folder")
    if int(kw.get("num_procs") or 1) == 1:  # the page's worker threads must not be forked
        warm_up(urls, options)
    skip_session_validation()
    freeze_startup_heap()
    # torch loads in the worker while the server starts; with --num-procs the children fork
    # first and each starts its own on its first upload (a worker's pipes must not be shared)
    if kw.pop("query_worker_start", False) and int(kw.get("num_procs") or 1) == 1:
        shared_worker().start()
    install_guards(LoginPolicy(attempts=int(kw.pop("login_attempts", 5)), window=float(kw.pop("login_window", 300.0)),
                               delay=float(kw.pop("login_delay", 1.0))))
    install_latest_pointer_wins()
    kw.setdefault("title", "hoverlay explorer")
    kw.setdefault("liveness", True)
    pn.config.exception_handler = show_session_error
    if int(kw.get("num_procs") or 1) != 1:
        stop_workers_with_supervisor()
    return pn.serve(session_factory(urls, options, reload_interval), port=port, address=address,
                    show=show, **kw)


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """``pn.serve`` keywords from parsed ``hoverlay serve`` arguments."""
    extra: dict[str, Any] = {name: getattr(args, name) for name in SERVER_ARGUMENTS
                             if getattr(args, name, None) is not None}
    if getattr(args, "allow_websocket_origin", None):
        extra["websocket_origin"] = args.allow_websocket_origin
    if getattr(args, "num_procs", 1) != 1:
        extra["num_procs"] = args.num_procs
    if getattr(args, "admin", False):
        extra["admin"] = True
    for name in ("check_unused_sessions", "unused_session_lifetime"):  # Bokeh's names, in ms
        value = getattr(args, name, None)
        if value is not None:
            if value <= 0:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be > 0 milliseconds, got {value}")
            extra[f"{name}_milliseconds"] = value
    for name in ("login_attempts", "login_window", "login_delay"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 0 or (name == "login_attempts" and value < 1):
                raise ServeConfigError(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'login_attempts' else '>= 0'}, got {value}")
            extra[name] = value
    if getattr(args, "oauth_extra_params", None):
        try:
            extra["oauth_extra_params"] = dict(json.loads(args.oauth_extra_params))
        except (ValueError, TypeError) as exc:
            raise ServeConfigError(f"--oauth-extra-params is not a JSON object: {exc}") from None
    return extra


#: The allocator ``hoverlay serve`` runs Python on, unless ``PYTHONMALLOC`` says otherwise.
SERVER_ALLOCATOR = "malloc"


def use_system_allocator() -> None:
    """Restart this process with ``PYTHONMALLOC=malloc``, unless ``PYTHONMALLOC`` is set already.

    Python's own small-object allocator takes memory in 1 MiB arenas and gives an arena back
    only once every block in it is free. A session is some 23,000 objects (and their small
    buffers), and the few blocks that outlive a burst of sessions (tracemalloc found < 100 kB:
    pending callbacks, cache entries, log records) keep most of the burst's arenas: measured
    after 20 sessions had closed and every object of theirs was collected, 130 arenas instead of
    68, holding 61 MB of empty pools — the server's RSS stayed 50% above what it was before
    them, however long it waited (``MALLOC_ARENA_MAX=2`` changed nothing). With the C allocator the
    pages of freed blocks go back to the system at the next ``malloc_trim``
    (:func:`explorer.session.release_memory`): RSS came back to within 4%. The price, measured
    on the project's 2 shared cores (noisy): session builds took 5-10% more CPU. A value of
    ``PYTHONMALLOC`` that is already set is kept (``PYTHONMALLOC=pymalloc``: Python's allocator).

    Linux with glibc only (elsewhere there is no ``malloc_trim``). It runs first in
    :func:`main_serve`, before Panel is imported, anything is logged or a thread started; the
    process keeps its id, arguments and open files.
    """
    if os.environ.get("PYTHONMALLOC") or not sys.platform.startswith("linux") or not sys.orig_argv:
        return
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return
    if not libc.startswith("glibc"):
        return
    os.environ["PYTHONMALLOC"] = SERVER_ALLOCATOR
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def main_serve(args: argparse.Namespace) -> int:
    """Run ``hoverlay serve`` from parsed arguments; blocks until interrupted."""
    use_system_allocator()
    from .query_worker import QueryWorkerConfig, configure_shared_worker

    level = getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO)
    logging.getLogger("hoverlay.explorer").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {name: getattr(args, name) for name in ("layer", "page_size", "ncols", "tile_px", "k", "cmap", "live_topk",
                                                "browser_hover_budget")
               if getattr(args, name, None) is not None}
    if getattr(args, "query_folder", None):
        options["query_folders"] = [str(f) for f in args.query_folder]
    configure_shared_worker(QueryWorkerConfig.from_args(args))
    if getattr(args, "read_cache", None) is not None:
        from .resources import set_read_cache

        set_read_cache(args.read_cache)
    try:
        extra = server_options(args)
        check_auth(extra)
        storage_options = STORAGE_OPTIONS.coerce(args.storage_options, FLAG) if getattr(
            args, "storage_options", None) else None
    except UsageError as exc:
        print(f"hoverlay serve: {exc}", file=sys.stderr)
        return exc.exit_code
    prefix = "/" + str(extra.get("prefix", "")).strip("/") if extra.get("prefix") else ""
    print(f"hoverlay explorer: http://{args.address}:{args.port}{prefix}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop a server
        serve(args.stores, port=args.port, address=args.address, show=args.show,
              query_worker_start=bool(getattr(args, "query_worker_start", False)),
              reload_interval=getattr(args, "reload_interval", DEFAULT_INTERVAL),
              storage_options=storage_options, **options, **extra)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m hoverlay.explorer.serve",
                                                         description="Serve the hoverlay explorer."))
    try:
        return main_serve(parser.parse_args(argv))
    except HoverlayError as exc:  # a store that does not open: one line, as `hoverlay serve` says it
        print(f"hoverlay serve: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
