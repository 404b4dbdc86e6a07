"""Where deferred work of one explorer session runs, per-session transport tweaks, and the
registry of this process's sessions.

The slow parts of a hover (layer view, top-k search) wait for the pointer to rest and run off
the event loop. How to "wait" and how to come back depends on where the app lives:

- a Bokeh/Panel server session: ``doc.add_timeout_callback`` and ``doc.add_next_tick_callback``,
  which also take the document lock the server requires for model changes;
- a notebook kernel (a running asyncio loop, no server session): ``loop.call_later`` and
  ``loop.call_soon_threadsafe``;
- no loop at all (scripts, unit tests): run at once, synchronously.

Under overload a session's pointer moves must not queue: :class:`LatestPointerWins` (the
server's websocket handler) drops the moves a newer one of the same session supersedes before
the loop gets to them, and the rest timer does not fire while such input waits.

Process-wide events have to reach sessions too: a new commit of a store (:mod:`explorer.reload`)
and a client update the app refused (a widget value no real page can send). Served sessions are
therefore registered here, keyed by their Bokeh document, and forgotten when Bokeh destroys them;
then the memory of a burst of closed sessions goes back to the system (:func:`release_memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import numbers
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future
from typing import Any

log = logging.getLogger(__name__)

#: Served sessions of this process: Bokeh document -> the session's state (an ``ExplorerState``).
_SESSIONS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def served(doc: Any) -> bool:
    """Whether ``doc`` is a Bokeh server session's document (not a notebook's or a script's,
    and not one Bokeh has destroyed): only it has a document lock, a server loop and a page
    that pulls it."""
    return doc is not None and getattr(doc, "session_context", None) is not None


def in_document(doc: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with Panel's current document set to ``doc``.

    Bokeh runs a session callback with *its* current document set, but Panel asks its own
    context variable first, and a callback inherits the context it was scheduled from (a worker
    thread, a task started while another session was being created). With the wrong one, Panel
    hands out shared models (stylesheets) cached for another session's document and Bokeh
    refuses the update ("Models must be owned by only a single document": seen once in a
    20-session run before this wrapper, in a top-k callback; not reproduced on demand).
    """
    from panel.io.state import set_curdoc

    def run() -> Any:
        with set_curdoc(doc):
            return fn()

    return run


#: A session timer that fires this many ms late found the server's loop busy (see :class:`_Timer`).
LATE_MS = 40.0
#: How often a late timer waits again before it runs anyway.
MAX_DEFERRALS = 6
#: How often a timer waits again for its session's unread input (see :func:`input_waiting`):
#: a client that keeps sending is not resting, but the slow work runs after this many waits.
MAX_INPUT_WAITS = 50


class _Timer:
    """A server session's timeout that waits again when it fires late.

    The explorer's "pointer rests" timer (layer view, top-k search and its cards: tens to hundreds
    of ms of loop time) is restarted by every pointer move. When the loop is busy — many sessions
    hovering at once — a timer fires late, typically before the loop has read the same session's
    next moves, which would have cancelled it; running the slow work then makes the loop busier
    still, and every session's hover latency collapses. So a late timer re-arms itself, up to
    :data:`MAX_DEFERRALS` times: slow work yields to the hover path under load and runs as soon as
    the loop keeps up. Measured, 20 sessions x 15 moves at 15/s then a rest, same machine: hover
    p50 5.4 s / p99 10.1 s without, 0.5 s / 6.6 s with.

    It also waits while its session has input the loop has not handled yet (:func:`input_waiting`):
    the pointer has not rested if its next move is parked or still being read. And a cancelled
    timer never runs: Bokeh may already have dispatched it — it waits for the document lock
    behind the very move that cancels it — and such a timer used to re-arm itself and run the
    slow work seconds later, in the middle of the stroke (measured, 20 sessions hovering 10 s
    without pause: 150 rests instead of 42, half of the loop's time, move -> overlays p50 0.2-0.3 s
    and max 4 s; with the flag p50 40 ms and max 0.4 s).
    """

    def __init__(self, doc: Any, fn: Callable[[], None], delay_ms: float):
        self.doc, self.fn, self.delay_ms = doc, fn, delay_ms
        self.deferrals = 0
        self.waits = 0
        self.cancelled = False
        self.handle: Any = None
        self._arm()

    def _arm(self) -> None:
        self.due = time.monotonic() + self.delay_ms / 1000
        self.handle = self.doc.add_timeout_callback(in_document(self.doc, self._fire), self.delay_ms)

    def _fire(self) -> None:
        if self.cancelled:  # Bokeh had dispatched it (it waited for the document lock) when cancelled
            return
        self.handle = None
        late_ms = (time.monotonic() - self.due) * 1000
        if late_ms > LATE_MS and self.deferrals < MAX_DEFERRALS:
            self.deferrals += 1
            self._arm()
            return
        if self.waits < MAX_INPUT_WAITS and input_waiting(self.doc):
            # the client has said more than the loop has read yet (a move parked by
            # LatestPointerWins, or frames read but not parsed): the pointer has not rested
            self.waits += 1
            self._arm()
            return
        self.fn()

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            with contextlib.suppress(ValueError):  # it already ran
                self.doc.remove_timeout_callback(self.handle)
            self.handle = None


class Scheduler:
    """Timers and worker-thread jobs for one session, in whatever loop the session has."""

    def __init__(self, doc: Any):
        self.doc = doc if served(doc) else None
        self.loop: asyncio.AbstractEventLoop | None = None
        if self.doc is None:
            with contextlib.suppress(RuntimeError):
                self.loop = asyncio.get_running_loop()

    @property
    def synchronous(self) -> bool:
        return self.doc is None and self.loop is None

    def later(self, fn: Callable[[], None], delay_ms: int) -> Any:
        """Run ``fn`` after ``delay_ms`` (at once when there is no loop); returns a handle.

        In a server session the timer yields to a busy loop (see :class:`_Timer`).
        """
        if self.doc is not None:
            return _Timer(self.doc, fn, delay_ms)
        if self.loop is not None:
            return self.loop.call_later(delay_ms / 1000, fn)
        fn()
        return None

    def soon(self, fn: Callable[[], None], delay_ms: int = 0) -> Any:
        """Run ``fn`` after ``delay_ms`` on the session's loop, never deferred (at once without
        a loop): for work that must happen, but only once for a burst of events."""
        if self.doc is not None:
            return self.doc.add_timeout_callback(in_document(self.doc, fn), delay_ms)
        if self.loop is not None:
            return self.loop.call_later(delay_ms / 1000, fn)
        fn()
        return None

    def cancel(self, handle: Any) -> None:
        if handle is None:
            return
        if isinstance(handle, _Timer):
            handle.cancel()
        elif self.doc is not None:
            with contextlib.suppress(ValueError):  # it already ran
                self.doc.remove_timeout_callback(handle)
        else:
            handle.cancel()

    def in_thread(self, executor: Executor, fn: Callable[..., Any], *args: Any,
                  done: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``fn(*args)`` on ``executor``; ``done(result, error)`` then runs back on the loop."""
        if self.synchronous:
            try:
                result = fn(*args)
            except Exception as exc:
                done(None, exc)
            else:
                done(result, None)
            return
        self.when_done(executor.submit(fn, *args), done)

    def when_done(self, future: Future[Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """``done(result, error)`` back on the loop once ``future`` ends (at once, waiting for it,
        when there is no loop): for futures that another thread resolves (the model worker)."""
        if self.synchronous:
            done(*_outcome(future))
            return

        def back() -> None:
            done(*_outcome(future))

        if self.doc is not None:
            doc, callback = self.doc, in_document(self.doc, back)
            future.add_done_callback(lambda f: _next_tick(doc, callback))
        else:
            loop = self.loop
            assert loop is not None
            future.add_done_callback(lambda f: loop.call_soon_threadsafe(back))


def _outcome(future: Future[Any]) -> tuple[Any, BaseException | None]:
    """``(result, None)`` or ``(None, error)`` of an ended future; a cancelled one's error is a
    ``CancelledError`` (``future.exception()`` would raise it instead)."""
    if future.cancelled():
        return None, CancelledError()
    exc = future.exception()
    return (None, exc) if exc is not None else (future.result(), None)


def _next_tick(doc: Any, callback: Callable[[], None]) -> None:
    """``doc.add_next_tick_callback(callback)`` from any thread, unless Bokeh has destroyed the
    session meanwhile (a search still running when its page closed): then there is no one to
    show the result to, and a destroyed document has no callback manager left to ask."""
    if doc.session_context is None:
        return
    with contextlib.suppress(AttributeError):  # destroyed between the check and the call
        doc.add_next_tick_callback(callback)


def set_nodelay(doc: Any) -> None:
    """Disable Nagle's algorithm on the session's websockets.

    Panel writes a patch as several websocket frames (header, metadata, content, one per binary
    buffer); with Nagle on, the kernel holds later small frames until the browser's delayed ACK
    (~40 ms on Linux), measured as +25 ms p50 on pointer-move -> repaint. Tornado leaves
    ``TCP_NODELAY`` off unless asked and Bokeh does not ask.
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


# ============================================================ pointer moves under overload
#: Name ending of the sources a page writes on every pointer move (``<prefix>-pointer`` of
#: :class:`explorer.figures.SharedSources`, ``compare-pointer``): only their newest row matters.
POINTER_SOURCE_SUFFIX = "-pointer"
_NO_CLICK = object()


def _finished(coro: Any) -> Any:
    """The value of a coroutine that completes without suspending (Bokeh's message assembly)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a coroutine expected to complete at once suspended")


def _click_of(event: Mapping[str, Any]) -> Any:
    """The ``click`` column of a pointer row as the client encoded it (``_NO_CLICK``: none)."""
    new = event.get("new")
    if isinstance(new, dict) and new.get("type") == "map":
        for entry in new.get("entries") or []:
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == "click":
                return entry[1]
    elif isinstance(new, dict) and "click" in new:
        return new["click"]
    return _NO_CLICK


class LatestPointerWins:
    """Bokeh's websocket handler, with a session's superseded pointer moves dropped unhandled.

    On the server hover path a page writes its pointer source on every patch change (15/s and
    more while the pointer crosses a grid). Tornado hands a connection's messages over one at a
    time, and Bokeh handles each completely — patch, Python callbacks, an ``OK`` reply written
    back — before reading the next, so under overload (20 sessions hovering on 2 cores) every
    move queued behind the slow ones was still handled in order: 30 s of input took 20-50 s more
    to drain. Here a pointer move is parked instead, and handled on the next loop turn, after the
    frames already read have been parsed: a newer move of the same source that arrived meanwhile
    replaces it (latest wins), so a session costs at most one move per loop turn however far
    behind the loop is. Everything else is handled in order, after a parked move: a click (its
    ``click`` column changed: never dropped, never merged into a move), widget changes, and any
    message that is not one plain ``ModelChanged`` of a ``*-pointer`` source's ``data``.
    """

    _pointer_next: Any = None  # the newest move not handled yet (a PATCH-DOC message)
    _pointer_task: asyncio.Future[None] | None = None
    _pointer_clicks: dict[str, Any] | None = None

    def on_message(self, fragment: str | bytes) -> Any:
        try:
            message = _finished(self._receive(fragment))  # type: ignore[attr-defined]
        except Exception as exc:  # what Bokeh's on_message does with a fragment it cannot read
            log.error("Unhandled exception receiving a message: %r", exc, exc_info=True)
            self._internal_error("server failed to parse a message")  # type: ignore[attr-defined]
            return None
        if message is None:  # a fragment of a message, or one Bokeh refused (and closed on)
            return None
        if not self._is_move(message):
            return self._handle_in_order(message)  # tornado reads on once this is handled
        self._pointer_next = message  # any older one is dropped: this one supersedes it
        if self._pointer_task is None:
            self._pointer_task = asyncio.ensure_future(self._handle_moves())
        return None  # tornado goes on reading this connection's frames at once

    def _is_move(self, message: Any) -> bool:
        """A PATCH-DOC that only writes a pointer source's data, with the click it had before."""
        connection = getattr(self, "connection", None)
        if message.msgtype != "PATCH-DOC" or message.buffers or connection is None:
            return False
        events = message.content.get("events") if isinstance(message.content, dict) else None
        if not (isinstance(events, list) and len(events) == 1 and isinstance(events[0], dict)):
            return False
        event = events[0]
        model = event.get("model")
        mid = model.get("id") if isinstance(model, dict) else None
        if event.get("kind") != "ModelChanged" or event.get("attr") != "data" or not isinstance(mid, str):
            return False
        from bokeh.models import ColumnDataSource

        try:
            source = connection.session.document.get_model_by_id(mid)
        except AttributeError:  # the session is being destroyed: Bokeh's own path says so
            return False
        if not (isinstance(source, ColumnDataSource) and str(source.name or "").endswith(POINTER_SOURCE_SUFFIX)):
            return False
        if self._pointer_clicks is None:
            self._pointer_clicks = {}
        click, before = _click_of(event), self._pointer_clicks.get(mid, _NO_CLICK)
        self._pointer_clicks[mid] = click
        return click is not _NO_CLICK and click == before

    async def _handle_moves(self) -> None:
        try:
            while self._pointer_next is not None:
                message, self._pointer_next = self._pointer_next, None
                await self._handle_now(message, reply=False)
        finally:
            self._pointer_task = None

    @property
    def input_waiting(self) -> bool:
        """A move parked, or taken and waiting for the document lock."""
        return self._pointer_task is not None

    async def _handle_in_order(self, message: Any) -> None:
        task = self._pointer_task
        if task is not None:  # the parked move came first
            await task
        await self._handle_now(message)

    async def _handle_now(self, message: Any, reply: bool = True) -> None:
        """What Bokeh's ``on_message`` does with a message once assembled; a move is not
        answered ``OK`` (BokehJS ignores the ``OK`` of a patch, and while that reply is written it
        holds the socket's write lock, which Panel's writes of the overlays wait for: with a
        reply per move a hovering session's overlays waited for the pointer to stop)."""
        try:
            work = await self._handle(message)  # type: ignore[attr-defined]
            if work and reply:
                await self._schedule(work)  # type: ignore[attr-defined]
        except Exception as exc:
            log.error("Handler or its work threw an exception: %r: %r", exc, message, exc_info=True)
            self._internal_error("server failed to handle a message")  # type: ignore[attr-defined]


def input_waiting(doc: Any) -> bool:
    """Whether a served session's client has sent what the loop has not handled yet: a move
    parked by :class:`LatestPointerWins` (or taken, and waiting for the document lock), or frames
    read from the socket but not parsed yet (Tornado reads a socket in one loop turn and parses
    what it read in the next)."""
    try:
        connections = doc.session_context._session._subscribed_connections
    except AttributeError:
        return False
    for conn in connections:
        handler = getattr(conn, "_socket", None)
        if getattr(handler, "input_waiting", False):
            return True
        stream = getattr(getattr(handler, "ws_connection", None), "stream", None)
        if getattr(stream, "_read_buffer_size", 0):
            return True
    return False


def install_latest_pointer_wins() -> None:
    """Serve websockets with :class:`LatestPointerWins` around the handler in place (Panel's, or
    the one :func:`explorer.guards.install` put there): call it after that, before ``pn.serve``."""
    import panel.io.server

    patterns = panel.io.server.per_app_patterns
    for i, (route, handler) in enumerate(patterns):
        if route == r"/ws" and not issubclass(handler, LatestPointerWins):
            patterns[i] = (route, type(f"LatestPointerWins{handler.__name__}", (LatestPointerWins, handler), {}))


# ================================================================== sessions of this process
def register_session(app: Any, doc: Any) -> bool:
    """Remember a served session's state until Bokeh destroys its document.

    Returns False (and remembers nothing) outside a server session: a notebook's app has no
    document lock to take and no server loop to be called back on.
    """
    if not served(doc):
        return False
    _SESSIONS[doc] = app
    doc.on_session_destroyed(lambda context: _forget(doc))
    return True


#: Seconds after the first session destroyed in a burst before memory goes back to the system.
RELEASE_DELAY_S = 1.0
_release_pending = False
_destroyed = 0  # sessions destroyed since the last release


def _forget(doc: Any) -> None:
    global _destroyed
    if _SESSIONS.pop(doc, None) is not None:
        _destroyed += 1
    _schedule_release()


def _schedule_release() -> None:
    """Give a closed burst of sessions' memory back once (not per session)."""
    global _release_pending
    if _release_pending:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    _release_pending = True
    loop.call_later(RELEASE_DELAY_S, release_memory)


def release_memory() -> None:
    """Collect the destroyed sessions' cycles and return freed heap pages to the system.

    A session's objects are cycles (param watchers, Bokeh models and their documents), so they go
    only at a collection; their page arrays (~15 MB of vectors and pixels) come from glibc's heap
    once its mmap threshold has grown past them, and stay in the process until ``malloc_trim``.
    Measured: 20 sessions closed, RSS +64 MB that neither a collection nor time gave back.
    The trim returns Python's small objects too only when they come from the C allocator, which
    ``hoverlay serve`` runs on (:func:`explorer.serve.use_system_allocator`): Python's own keeps
    an arena as long as any block in it lives. Logs the sessions released and the RSS after.
    """
    global _release_pending, _destroyed
    _release_pending = False
    import ctypes
    import ctypes.util
    import gc

    import psutil

    gc.collect()
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(name).malloc_trim(0)
    closed, _destroyed = _destroyed, 0
    log.info("memory of %d closed session(s) released: %d live, RSS %.0f MB", closed, len(_SESSIONS),
             psutil.Process().memory_info().rss / 2**20)


def sessions() -> list[tuple[Any, Any]]:
    """(document, app) of every live session of this process."""
    return list(_SESSIONS.items())


def app_of(doc: Any) -> Any | None:
    return _SESSIONS.get(doc) if doc is not None else None


def show_session_error(exc: BaseException) -> None:
    """``pn.config.exception_handler`` of the explorer's server.

    Panel calls it when a session callback raised, which in a working page means a client sent
    an update its widget could never produce (a page size of 10**9, a store that is not served):
    Panel has logged the traceback and reverted nothing else; we keep the server serving and tell
    *that* session why its input was ignored instead of failing silently.
    """
    import panel as pn

    from .text import client_message

    app = app_of(pn.state.curdoc)
    log.warning("session update rejected: %s: %s", type(exc).__name__, exc)
    if app is not None:
        with contextlib.suppress(Exception):  # the session may be closing
            app.message = f"ignored an invalid update: {client_message(exc)}"


# ============================================================ input the browser writes
def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    f = float(value)
    return int(f) if f.is_integer() else None


def pointer_flag(data: Mapping[str, Any], column: str) -> bool:
    """A pointer row's 0/1 column (``drawn``) is 1: client data, so anything but the integer 1
    (a string, a bool, a missing or empty column) is 0."""
    try:
        return _as_int(data[column][0]) == 1
    except (KeyError, IndexError, TypeError):
        return False


def pointer_cell(data: Mapping[str, Sequence[Any]], n_tiles: int,
                 grid: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """``(tile, y, x, click)`` of the pointer row a page wrote, or None for anything else.

    The ``grid-pointer`` source is written by the client, so it is input like a URL value: the
    page's JavaScript only writes a tile of the page and a cell of the snapping layer's
    ``grid = (H, W)`` (or tile -1 when the pointer leaves), but a hand-made websocket message can
    carry strings, nulls, negative or huge numbers, which would otherwise raise inside Bokeh's
    message handler or be clamped into a patch the user never pointed at.
    """
    try:
        tile, y, x, click = (_as_int(data[c][0]) for c in ("tile", "y", "x", "click"))
    except (KeyError, IndexError, TypeError):
        return None
    if tile is None or y is None or x is None or click is None:
        return None
    if not (0 <= tile < n_tiles and 0 <= y < grid[0] and 0 <= x < grid[1]):
        return None
    return tile, y, x, click
