"""One writer per store: an advisory lock held for the whole build.

Local stores use ``fcntl.flock`` on ``<store>/.hoverlay.lock``: the kernel drops it when the
process dies, so a SIGKILLed build never leaves a stale lock behind. Remote (fsspec) stores
use a lock object with the owner and a timestamp; one older than ``stale_after`` seconds is
taken over, because object stores have no way to know the owner died.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from types import TracebackType
from typing import Any

import fsspec

from .errors import StoreLockedError
from .urls import is_local, normalize_url

LOCK_NAME = ".hoverlay.lock"


class StoreLock:
    def __init__(self, store_url: str, stale_after: float = 6 * 3600,
                 storage_options: dict[str, Any] | None = None):
        self.url = normalize_url(store_url)
        self.stale_after = stale_after
        self.storage_options = storage_options or {}
        self._fd: int | None = None
        self._remote_path: str | None = None

    def _owner(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}

    def acquire(self) -> StoreLock:
        if is_local(self.url):
            import fcntl

            root = self.url.removeprefix("file://")
            os.makedirs(root, exist_ok=True)
            path = os.path.join(root, LOCK_NAME)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                os.close(fd)
                raise StoreLockedError(f"store {self.url!r} is being written by another build "
                                       f"({holder or 'unknown owner'}); wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._owner()).encode(), 0)
            self._fd = fd
            return self
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        path = f"{root.rstrip('/')}/{LOCK_NAME}"
        if fs.exists(path):
            owner: dict[str, Any] = {}
            with contextlib.suppress(Exception):
                owner = dict(json.loads(fs.cat_file(path)))
            age = time.time() - float(owner.get("time", 0))
            if age < self.stale_after:
                raise StoreLockedError(f"store {self.url!r} is locked by {owner} since {age:.0f}s; "
                                       f"it is taken over after {self.stale_after:.0f}s")
        fs.pipe_file(path, json.dumps(self._owner()).encode())
        self._remote_path = path
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._remote_path is not None:
            fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
            fs.rm(self._remote_path)
            self._remote_path = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
