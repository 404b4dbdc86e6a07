"""Serving the explorer: a Python function, argparse glue for ``hoverlay serve``, and ``-m``.

``serve()`` opens every store once in this process before the server starts, so a wrong path
fails at once with the store layer's message instead of in the first browser session; the
readers it opens are the ones the sessions share (``pn.state.as_cached``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import panel as pn

from .app import ExplorerApp, create_app
from .resources import get_reader

#: Keyword arguments of :func:`serve` that configure the app rather than the server.
APP_OPTIONS = frozenset(name for name in ExplorerApp.param if name not in ("name", "message"))


def session_factory(stores: list[str], options: dict[str, Any]) -> Callable[[], pn.viewable.Viewable]:
    """A plain function building one session's app (``pn.serve`` treats a partial as an object)."""

    def explorer_session() -> pn.viewable.Viewable:
        return create_app(stores, **options)

    return explorer_session


def serve(stores: Sequence[str] | str, port: int = 0, address: str = "127.0.0.1", show: bool = False,
          **kw: Any) -> Any:
    """Serve the explorer on ``address:port`` (0: any free port) with ``pn.serve``.

    Keyword arguments naming :class:`~explorer.app.ExplorerApp` parameters (``layer``,
    ``page_size``, ``k``, ``cmap``, ...) configure every session; the rest go to ``pn.serve``
    (``threaded``, ``start``, ``websocket_origin``, ``num_procs``, ...). Blocks unless
    ``threaded=True`` or ``start=False``; returns what ``pn.serve`` returns.
    """
    urls = [stores] if isinstance(stores, str) else [str(s) for s in stores]
    for url in urls:
        get_reader(url)  # fail fast, and warm the per-process cache the sessions share
    options = {k: kw.pop(k) for k in list(kw) if k in APP_OPTIONS}
    kw.setdefault("title", "hoverlay explorer")
    return pn.serve(session_factory(urls, options), port=port, address=address, show=show, **kw)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``hoverlay serve STORE [STORE ...]``."""
    parser.add_argument("stores", nargs="+", metavar="STORE", help="store path(s) or fsspec URL(s)")
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
    parser.add_argument("--no-live-topk", dest="live_topk", action="store_false", default=None,
                        help="search top-k only on pin / button, not whenever the pointer rests "
                             "(for large stores without an index)")
    return parser


def main_serve(args: argparse.Namespace) -> int:
    """Run ``hoverlay serve`` from parsed arguments; blocks until interrupted."""
    options = {name: getattr(args, name) for name in ("layer", "page_size", "ncols", "tile_px", "k", "cmap", "live_topk")
               if getattr(args, name, None) is not None}
    extra: dict[str, Any] = {}
    if args.allow_websocket_origin:
        extra["websocket_origin"] = args.allow_websocket_origin
    print(f"hoverlay explorer: http://{args.address}:{args.port}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop a server
        serve(args.stores, port=args.port, address=args.address, show=args.show, **options, **extra)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m explorer.serve",
                                                         description="Serve the hoverlay explorer."))
    return main_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
