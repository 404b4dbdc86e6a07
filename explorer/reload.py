"""Serving new commits without a restart: a cheap per-process watch on each store.

A build appends images while the explorer serves (see :mod:`stores.writer`): rows past
``committed`` are invisible to readers, and the root ``zarr.json`` is rewritten (atomically) only
when a wave is committed; FAISS indexes are replaced (``index/<layer>.json`` last) after the
images they cover. So "has anything a session could see changed?" is answered by a few ``stat``
calls: the root ``zarr.json`` and the index ``.json`` files. Every ``interval`` seconds each server
process does exactly that, in a worker thread, and only when a signature changed does it

1. re-read the root attributes into the process's shared reader (``StoreReader.refresh``, one
   small JSON document) — on a failure it keeps serving the last commit and retries next time;
2. drop the process's cached :class:`~stores.search.LayerSearch` objects of that store, and build
   fresh ones in the background, so the next top-k uses the new index (or falls back to exact
   search, with its warning, while the index is still being rebuilt);
3. tell every session of that store on its own document lock: it keeps its layer, query and
   page, and its image list, label choices and page count grow to the new commit.

Sessions therefore never see a half-written build, and see the new images within ``interval``
seconds of the commit. Several server processes (``--num-procs``, or several servers behind a
proxy) each watch for themselves: nothing is shared but the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hoverlay.stores.reader import Signature

from .options import DEFAULT_RELOAD_INTERVAL
from .resources import SEARCH_CACHE_KEY, evict, get_reader, get_search
from .session import in_document, sessions

log = logging.getLogger(__name__)

#: Seconds between two looks at a store (a few ``stat`` calls per store and process); declared
#: with the serve flags, which need no Panel.
DEFAULT_INTERVAL = DEFAULT_RELOAD_INTERVAL



def forget_searches(url: str) -> int:
    """Drop this process's cached ``LayerSearch`` objects of a store; returns how many.

    A search already running keeps its object (and its memory-mapped index) until it ends.
    """
    return evict(SEARCH_CACHE_KEY, url=str(url))


# ================================================================= one store, one process
class StoreWatcher:
    """Notices new commits / indexes of one store and refreshes this process's shared objects."""

    def __init__(self, url: str):
        self.url = str(url)
        self.signature: Signature | None = self._signature()
        self.generation = 0  # bumped on every change that was applied
        self._lock = threading.Lock()

    def _signature(self) -> Signature | None:
        try:
            return get_reader(self.url).signature()
        except Exception:  # the store being replaced right now; look again next time
            log.debug("could not stat %s", self.url, exc_info=True)
            return None

    def check(self) -> bool:
        """Apply a new commit / index if there is one (thread-safe); True when something changed.

        Runs in a worker thread: it only stats files unless something changed.
        """
        with self._lock:
            signature = self._signature()
            if signature is None or signature == self.signature:
                return False
            reader = get_reader(self.url)
            try:
                reader.refresh()
            except Exception:  # half-visible state, permissions, network: keep the last commit
                log.warning("could not re-read %s; serving its last commit", self.url, exc_info=True)
                return False
            dropped = forget_searches(self.url)
            self.signature = signature
            self.generation += 1
            log.info("store %s changed: %d committed images (generation %d, %d searches dropped)",
                     self.url, reader.n_images, self.generation, dropped)
            return True

    def warm(self) -> None:
        """Build the layer searches the next top-k will use (memory-maps the new indexes)."""
        reader = get_reader(self.url)
        for layer in reader.layers:
            try:
                get_search(self.url, layer)
            except Exception:
                log.warning("could not prepare the search of %s / %s", self.url, layer, exc_info=True)


# ============================================================ sessions see the new commit
def _apply_safely(app: Any) -> None:
    try:
        app.on_commit()
    except Exception:  # never break a session over a refresh: it still shows its last commit
        log.warning("session could not pick up the new commit of %s", getattr(app, "store", "?"),
                    exc_info=True)


def notify_sessions(url: str, items: Iterable[tuple[Any, Any]] | None = None) -> int:
    """Schedule ``app.on_commit()`` (:meth:`ExplorerState.on_commit`) on every live session showing ``url``; returns how many."""
    n = 0
    for doc, app in items if items is not None else sessions():
        if str(getattr(app, "store", "")) != str(url):
            continue
        with contextlib.suppress(Exception):  # a session being destroyed
            doc.add_next_tick_callback(in_document(doc, lambda app=app: _apply_safely(app)))
            n += 1
    return n


# ================================================================== the per-process loop
class Reloader:
    """Every ``interval`` seconds, check each watched store in a worker thread (one process)."""

    def __init__(self, interval: float = DEFAULT_INTERVAL):
        self.interval = float(interval)
        self.watchers: dict[str, StoreWatcher] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hoverlay-reload")
        self._task: asyncio.Task[None] | None = None
        self.checks = 0

    def watch(self, url: str) -> StoreWatcher:
        url = str(url)
        if url not in self.watchers:
            self.watchers[url] = StoreWatcher(url)
        return self.watchers[url]

    def start(self) -> None:
        """Start the loop on the running event loop (the server's), once."""
        if self._task is None and self.interval > 0:
            # a fresh context: not the one of the session being created (Panel's current document)
            loop = asyncio.get_running_loop()
            self._task = contextvars.Context().run(loop.create_task, self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            for url, watcher in list(self.watchers.items()):
                try:
                    changed = await loop.run_in_executor(self._executor, watcher.check)
                except Exception:
                    log.warning("checking %s for new commits failed", url, exc_info=True)
                    continue
                self.checks += 1
                if changed:
                    notify_sessions(url)
                    loop.run_in_executor(self._executor, watcher.warm)


_RELOADERS: dict[int, Reloader] = {}  # by process id: a forked server process starts its own
_RELOADERS_LOCK = threading.Lock()


def reloader(interval: float = DEFAULT_INTERVAL) -> Reloader:
    """This process's :class:`Reloader` (created on first use, after any fork)."""
    with _RELOADERS_LOCK:
        pid = os.getpid()
        if pid not in _RELOADERS:
            _RELOADERS[pid] = Reloader(interval)
        return _RELOADERS[pid]


def watch_session(app: Any, interval: float = DEFAULT_INTERVAL) -> Reloader | None:
    """Keep a served session up to date with its store's commits (call on session creation).

    Watches every store the app can switch to and starts this process's loop; nothing happens
    outside a running event loop (a script or a notebook without a server).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    r = reloader(interval)
    for url in list(app.store_keys):  # the store URLs
        r.watch(str(url))
    r.start()
    return r
