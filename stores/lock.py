"""One writer per store: an advisory lock held for the whole build, refreshed by a heartbeat.

Local stores use ``fcntl.flock`` on ``<store>/.hoverlay.lock``: the kernel drops it when the
process dies, so a SIGKILLed build never leaves a stale lock behind. The heartbeat rewrites
the owner line in that file (who holds it, and how recently it was alive), which is what a
refused build prints.

Remote (fsspec) stores use a lock *object* holding the owner, its heartbeat interval, the
time of its last heartbeat and a random token, created with an exclusive write (on S3 a
``PutObject`` with ``If-None-Match: *``, which the server refuses with 412 when the object
exists; gcsfs and adlfs have the same). Of two builds racing for a store exactly one create
succeeds — the server decides, there is no exists-then-write window. The winner then reads
the object back and checks its token, twice (the second time after as long as its write
took), which also catches an S3-compatible server that ignores the condition or checks it
apart from the write (moto: two creates racing on a loaded machine both passed the check).

Object stores cannot tell that the owner died, so the holder proves it is alive: a daemon
thread rewrites the object every ``heartbeat`` seconds (on S3 a ``PutObject`` with
``If-Match: <the ETag of its own last write>``, so it never overwrites a lock another build
took over). Another build takes the lock over only when the last heartbeat is more than
``stale_beats`` intervals old (a live holder, however long its build, never is), or at once
when the owner ran on this host and its process is gone (a build killed with ``kill -9``,
rerun on the same machine). The takeover is itself conditional (``If-Match`` on the stale
object's ETag), so two builds taking over one stale lock cannot both succeed. Ages compare
the holder's clock with the taker's: hosts' clocks must agree to well within
``(stale_beats - 1) * heartbeat`` (NTP does). A holder that could not refresh its lock for
``stale_beats - 1`` intervals (the object store unreachable for it), or finds it taken over,
marks it lost: :meth:`StoreLock.check` then raises, and the build stops before its next
commit. Locks written without a heartbeat (older hoverlay) go stale after ``stale_after``.

A filesystem without exclusive create falls back to exists-then-write plus the read-back.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from hoverlay.errors import UsageError

from .errors import StoreLockedError
from .urls import filesystem, is_local, normalize_url

log = logging.getLogger(__name__)

LOCK_NAME = ".hoverlay.lock"
#: seconds between heartbeats; the environment variable overrides it for every build
HEARTBEAT_ENV = "HOVERLAY_LOCK_HEARTBEAT"
DEFAULT_HEARTBEAT = 30.0
#: a lock whose last heartbeat is older than this many intervals may be taken over
STALE_BEATS = 4
#: the age after which a lock without heartbeats (written by an older hoverlay) is stale
LEGACY_STALE_AFTER = 6 * 3600.0
#: how long an interrupted build waits for the lock's removal before it leaves it behind
#: (the object store may be what failed: the next build takes over a dead owner's lock)
RELEASE_WAIT = 3.0
#: the local owner line is padded to this size, so rewriting it never shows a reader a
#: truncated file
_LOCAL_RECORD = 512


def default_heartbeat() -> float:
    """The heartbeat interval: ``$HOVERLAY_LOCK_HEARTBEAT`` seconds, else 30."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return DEFAULT_HEARTBEAT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UsageError(f"{HEARTBEAT_ENV}={text!r} is not a positive number of seconds")
    return value


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


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class StoreLock:
    """The writer lock of the store at ``store_url`` (a context manager; see the module)."""

    def __init__(self, store_url: str, stale_after: float = LEGACY_STALE_AFTER,
                 storage_options: dict[str, Any] | None = None, heartbeat: float | None = None,
                 stale_beats: int = STALE_BEATS):
        self.url = normalize_url(store_url)
        self.stale_after = stale_after
        self.storage_options = storage_options or {}
        self.heartbeat = float(heartbeat) if heartbeat is not None else default_heartbeat()
        self.stale_beats = stale_beats
        self._fd: int | None = None
        self._fs: Any = None
        self._remote_path: str | None = None
        self._token = ""
        self._etag: str | None = None  # of our last write of the lock object (S3)
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0  # time.monotonic() of the last successful heartbeat
        self._lost: str | None = None
        #: the owner of the stale lock this one replaced (None: the lock was free)
        self.took_over: dict[str, Any] | None = None

    # -- what the lock holds -------------------------------------------------------------

    def _owner(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "time": self._since,
                "beat": time.time(), "heartbeat": self.heartbeat}

    def _remote_data(self) -> bytes:
        return json.dumps({**self._owner(), "token": self._token}).encode()

    def _stale(self, owner: dict[str, Any]) -> bool:
        """Whether ``owner``'s lock may be taken over: its process is gone (this host), or it
        missed ``stale_beats`` heartbeats (an owner without heartbeats: ``stale_after``)."""
        if _owner_dead(owner):
            return True
        beat, every = _number(owner.get("beat")), _number(owner.get("heartbeat"))
        if beat is not None and every is not None and every > 0:
            return time.time() - beat > self.stale_beats * every
        return time.time() - (_number(owner.get("time")) or 0.0) > self.stale_after

    def _describe(self, owner: dict[str, Any]) -> str:
        now = time.time()
        shown = {k: owner[k] for k in ("host", "pid") if k in owner}
        since, beat, every = _number(owner.get("time")), _number(owner.get("beat")), _number(owner.get("heartbeat"))
        parts = [", ".join(f"{k} {v}" for k, v in shown.items()) or "unknown owner"]
        if since:
            parts.append(f"for {now - since:.0f}s")
        if beat is not None and every:
            parts.append(f"last heartbeat {max(0.0, now - beat):.0f}s ago")
            rule = (f"a lock is taken over once its holder misses {self.stale_beats} heartbeats "
                    f"({self.stale_beats * every:.0f}s)")
        else:
            rule = f"a lock without heartbeats is taken over after {self.stale_after:.0f}s"
        return f"{'; '.join(parts)}); {rule}"

    def _locked(self, owner: dict[str, Any]) -> StoreLockedError:
        return StoreLockedError(f"store {self.url!r} is being written by another build "
                                f"({self._describe(owner)}")

    # -- acquire -------------------------------------------------------------------------

    def acquire(self) -> StoreLock:
        self._since = time.time()
        self._lost = self.took_over = None
        if is_local(self.url):
            self._acquire_local()
        else:
            self._acquire_remote()
        self._last_beat = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name="hoverlay-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        root = self.url.removeprefix("file://")
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            try:
                owner = dict(json.loads(text))
            except (ValueError, TypeError):
                raise StoreLockedError(f"store {self.url!r} is being written by another build "
                                       f"({text or 'unknown owner'}); wait for it to finish") from None
            now = time.time()
            beat = _number(owner.get("beat"))
            alive = f", last heartbeat {max(0.0, now - beat):.0f}s ago" if beat is not None else ""
            raise StoreLockedError(f"store {self.url!r} is being written by another build (host "
                                   f"{owner.get('host')}, pid {owner.get('pid')}{alive}); wait for "
                                   f"it to finish") from None
        os.ftruncate(fd, 0)
        self._fd = fd
        self._write_local()

    def _write_local(self) -> None:
        assert self._fd is not None
        os.pwrite(self._fd, json.dumps(self._owner()).encode().ljust(_LOCAL_RECORD), 0)

    def _acquire_remote(self) -> None:
        fs, root = filesystem(self.url, self.storage_options, small_objects=True)
        path = f"{root.rstrip('/')}/{LOCK_NAME}"
        self._fs, self._token = fs, uuid.uuid4().hex
        data = self._remote_data()
        began = time.monotonic()
        try:
            self._create(fs, path, data)
        except FileExistsError:
            self._take_over_if_stale(fs, path, data)
        except (ValueError, NotImplementedError, TypeError):  # no exclusive create on this filesystem
            if fs.exists(path):
                self._take_over_if_stale(fs, path, data)
            else:
                fs.pipe_file(path, data)
        wrote = time.monotonic() - began
        holder = self._read(fs, path)
        if holder.get("token") == self._token:
            # a server that checks the condition and stores the object in two steps (moto does)
            # can pass a rival's create whose check ran before ours was stored; that write lands
            # within about one write's time after ours: look again after that long
            time.sleep(min(1.0, max(0.05, wrote)))
            holder = self._read(fs, path)
        if holder.get("token") != self._token:  # a server that ignored the condition
            raise self._locked(holder)
        self._remote_path = path

    @staticmethod
    def _s3(fs: Any) -> bool:
        return hasattr(fs, "call_s3")

    def _create(self, fs: Any, path: str, data: bytes) -> None:
        """Write the lock object only where none exists (FileExistsError otherwise)."""
        if self._s3(fs):  # If-None-Match: *; the answer has our object's ETag
            out = fs.pipe_file(path, data, mode="create")
            self._etag = (out or {}).get("ETag")
            return
        with fs.open(path, "xb") as f:
            f.write(data)

    @staticmethod
    def _read(fs: Any, path: str) -> dict[str, Any]:
        fs.invalidate_cache(path)  # listings cached by an earlier call must not answer
        try:
            return dict(json.loads(fs.cat_file(path)))
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError):  # torn or foreign content: an owner we cannot name
            return {"time": 0}

    def _take_over_if_stale(self, fs: Any, path: str, data: bytes) -> None:
        """Replace a stale lock (see :meth:`_stale`), or raise StoreLockedError."""
        fs.invalidate_cache(path)
        try:
            info = fs.info(path)
        except FileNotFoundError:  # released meanwhile: compete for it again, once
            try:
                self._create(fs, path, data)
            except FileExistsError:
                raise self._locked(self._read(fs, path)) from None
            return
        owner = self._read(fs, path)
        if owner.get("token") == self._token:  # our own create, retried after a lost answer
            self._etag = info.get("ETag")
            return
        if not self._stale(owner):
            raise self._locked(owner)
        self.took_over = {k: v for k, v in owner.items() if k != "token"}
        log.warning("store %r: taking over the stale lock of another build (%s", self.url, self._describe(owner))
        etag = info.get("ETag")
        if etag and self._s3(fs):  # S3: replace exactly the stale object we saw
            self._etag = self._put_if_match(fs, path, data, etag)
            if self._etag is None:  # 412: someone else replaced it first
                raise self._locked(self._read(fs, path))
        else:
            fs.rm(path)
            try:
                self._create(fs, path, data)
            except FileExistsError:
                raise self._locked(self._read(fs, path)) from None

    @staticmethod
    def _put_if_match(fs: Any, path: str, data: bytes, etag: str) -> str | None:
        """PutObject If-Match ``etag``: the new ETag, or None when the object is another."""
        bucket, key, _ = fs.split_path(path)
        try:
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
        except FileNotFoundError:  # released (a conditional put on no object)
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # s3fs's PreconditionFailed
                return None
            raise  # a timeout: the caller decides
        finally:
            fs.invalidate_cache(path)
        return str(out.get("ETag")) if out.get("ETag") else None

    # -- heartbeat -----------------------------------------------------------------------

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again; check() reports
                log.debug("lock heartbeat failed: %s", exc)
            if self._lost is None and time.monotonic() - self._last_beat > (self.stale_beats - 1) * self.heartbeat:
                self._lost = (f"its heartbeat could not be written for "
                              f"{time.monotonic() - self._last_beat:.0f}s, so another build may "
                              f"have taken it over")
            if self._lost is not None:
                return

    def _beat(self) -> None:
        """Refresh the lock once (its ``beat`` time), never overwriting another's lock."""
        if self._fd is not None:
            self._write_local()
            self._last_beat = time.monotonic()
            return
        fs, path = self._fs, self._remote_path
        if path is None:
            return
        data = self._remote_data()
        if self._s3(fs) and self._etag:
            try:
                etag = self._put_if_match(fs, path, data, self._etag)
            except OSError:
                etag = None  # a timeout: did the write land? the object says
            if etag is not None:
                self._etag, self._last_beat = etag, time.monotonic()
                return
        owner = self._read(fs, path)
        if owner.get("token") != self._token:
            self._lost = (f"another build took it over (host {owner.get('host')}, pid {owner.get('pid')})"
                          if owner else "its lock object was removed")
            return
        if self._s3(fs):  # ours, but not the ETag we knew (a retried write): learn it
            fs.invalidate_cache(path)
            self._etag = fs.info(path).get("ETag")
        else:
            fs.pipe_file(path, data)
            self._last_beat = time.monotonic()

    def check(self) -> None:
        """Raise StoreLockedError when this build no longer safely holds the lock (it was
        taken over, or could not be refreshed for ``stale_beats - 1`` heartbeats)."""
        if self._lost is not None:
            raise StoreLockedError(f"this build lost its lock on store {self.url!r}: {self._lost}; "
                                   f"it stops before writing more (the last commit is intact)")

    # -- release -------------------------------------------------------------------------

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=RELEASE_WAIT)  # a beat stuck on a hung request is left behind

    def release(self, wait: float | None = None) -> None:
        """Stop the heartbeat and remove the lock (never another build's). ``wait``: give up
        on a remote removal after that many seconds and leave the object (see RELEASE_WAIT)."""
        self._stop_heartbeat()
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._remote_path is not None:
            fs, path, self._remote_path = self._fs, self._remote_path, None
            if wait is None:
                self._remove(fs, path)
                return
            remover = threading.Thread(target=self._remove, args=(fs, path, True), daemon=True,
                                       name="hoverlay-lock-release")
            remover.start()
            remover.join(timeout=wait)

    def _remove(self, fs: Any, path: str, quiet: bool = False) -> None:
        try:
            if self._read(fs, path).get("token") == self._token:  # never another's
                fs.rm(path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - after a failed build: the build's error is the news
            if not quiet:
                raise
            log.debug("lock not removed: %s", exc)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # a failed build may have failed because the object store stopped answering: its
        # lock is then removed within RELEASE_WAIT or left to be taken over
        self.release(wait=RELEASE_WAIT if exc is not None else None)
