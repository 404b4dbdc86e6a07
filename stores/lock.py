"""One writer per store: an advisory lock held for the whole build.

Local stores use ``fcntl.flock`` on ``<store>/.hoverlay.lock``: the kernel drops it when the
process dies, so a SIGKILLed build never leaves a stale lock behind.

Remote (fsspec) stores use a lock *object* holding the owner, a timestamp and a random token,
created with an exclusive write (``open(path, "xb")``: on S3 a ``PutObject`` with
``If-None-Match: *``, which the server refuses with 412 when the object exists; gcsfs and adlfs
have the same). Of two builds racing for a store exactly one create succeeds — the server
decides, there is no exists-then-write window. The winner then reads the object back and
checks its token, which also catches an S3-compatible server that ignores the condition
(unless both writes land before either read). One older than ``stale_after`` seconds is taken
over, because object stores have no way to know the owner died — except one written by a
process of this host that no longer exists (a build killed with ``kill -9``, rerun on the
same machine), which is taken over at once. On S3 the takeover is a
``PutObject`` with ``If-Match: <the stale object's ETag>``, so two builds taking over the same
stale lock cannot both succeed either. A filesystem without exclusive create falls back to
exists-then-write plus the read-back.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from types import TracebackType
from typing import Any

import fsspec

from .errors import StoreLockedError
from .urls import is_local, normalize_url

LOCK_NAME = ".hoverlay.lock"


def _owner_dead(owner: dict[str, Any]) -> bool:
    """The lock's owner ran on this host and its process is gone (e.g. a killed build)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class StoreLock:
    def __init__(self, store_url: str, stale_after: float = 6 * 3600,
                 storage_options: dict[str, Any] | None = None):
        self.url = normalize_url(store_url)
        self.stale_after = stale_after
        self.storage_options = storage_options or {}
        self._fd: int | None = None
        self._remote_path: str | None = None
        self._token = ""

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
        return self._acquire_remote()

    def _acquire_remote(self) -> StoreLock:
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        path = f"{root.rstrip('/')}/{LOCK_NAME}"
        self._token = uuid.uuid4().hex
        data = json.dumps({**self._owner(), "token": self._token}).encode()
        try:
            with fs.open(path, "xb") as f:  # atomic: If-None-Match: * on S3
                f.write(data)
        except FileExistsError:
            self._take_over_if_stale(fs, path, data)
        except (ValueError, NotImplementedError):  # no exclusive create on this filesystem
            if fs.exists(path):
                self._take_over_if_stale(fs, path, data)
            else:
                fs.pipe_file(path, data)
        holder = self._read(fs, path)
        if holder.get("token") != self._token:  # a server that ignored the condition
            raise self._locked(holder)
        self._remote_path = path
        return self

    @staticmethod
    def _read(fs: Any, path: str) -> dict[str, Any]:
        fs.invalidate_cache(path)  # listings cached by an earlier call must not answer
        try:
            return dict(json.loads(fs.cat_file(path)))
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError):  # torn or foreign content: an owner we cannot name
            return {"time": 0}

    def _locked(self, owner: dict[str, Any]) -> StoreLockedError:
        age = time.time() - float(owner.get("time", 0))
        shown = {k: v for k, v in owner.items() if k != "token"}
        return StoreLockedError(f"store {self.url!r} is being written by another build ({shown}, "
                                f"for {age:.0f}s); a lock is taken over after {self.stale_after:.0f}s")

    def _take_over_if_stale(self, fs: Any, path: str, data: bytes) -> None:
        """Replace a lock older than ``stale_after``, or raise StoreLockedError."""
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
        except FileNotFoundError:  # released meanwhile: compete for it again, once
            self._create(fs, path, data)
            return
        owner = self._read(fs, path)
        if time.time() - float(owner.get("time", 0)) < self.stale_after and not _owner_dead(owner):
            raise self._locked(owner)
        etag = info.get("ETag")
        if etag and hasattr(fs, "call_s3"):  # S3: replace exactly the stale object we saw
            bucket, key, _ = fs.split_path(path)
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
            except OSError:  # 412: someone else replaced it first
                raise self._locked(self._read(fs, path)) from None
            fs.invalidate_cache(path)
        else:
            fs.rm(path)
            self._create(fs, path, data)

    def _create(self, fs: Any, path: str, data: bytes) -> None:
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise self._locked(self._read(fs, path)) from None

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._remote_path is not None:
            fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
            if self._read(fs, self._remote_path).get("token") == self._token:  # never another's
                fs.rm(self._remote_path)
            self._remote_path = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
