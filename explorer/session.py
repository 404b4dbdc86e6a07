"""Per-session transport tweaks for the Bokeh server the explorer runs in."""

from __future__ import annotations

import contextlib
from typing import Any


def set_nodelay(doc: Any) -> None:
    """Disable Nagle's algorithm on the session's websockets.

    Panel writes a patch as several small websocket frames; with Nagle on, the kernel holds the
    later ones until the browser's delayed ACK (~40 ms on Linux), which measured as +25 ms p50 on
    pointer-move -> repaint. Tornado leaves ``TCP_NODELAY`` off unless asked; Bokeh does not ask.
    """
    try:
        connections = doc.session_context._session._subscribed_connections
    except AttributeError:
        return
    for conn in connections:
        socket = getattr(conn, "_socket", None)
        if socket is not None and hasattr(socket, "set_nodelay"):
            with contextlib.suppress(Exception):  # a stream closing meanwhile
                socket.set_nodelay(True)
