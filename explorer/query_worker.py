"""The explorer's side of the model worker: embed an uploaded image without importing torch.

One :class:`QueryWorker` per server process (:func:`shared_worker`), shared by every session.
It starts ``python -m hoverlay.pipeline.query_worker`` on first use (or at server start:
``hoverlay serve --query-worker-start``), keeps it warm, and sends it requests over the child's
stdin/stdout as the framed messages of :mod:`hoverlay.stores.query_wire`.

Why a plain subprocess with framed messages, not ``multiprocessing``:

- the explorer process must not import torch, and a ``multiprocessing`` target is a function the
  parent pickles *by reference*, importing its module; a subprocess runs a module by name;
- ``spawn`` re-imports the parent's ``__main__`` (a ``panel serve`` script, a notebook) in the
  child, and ``fork`` of a threaded Tornado server is unsafe; a subprocess inherits nothing but
  its environment;
- answers are raw array bytes described by a JSON header — no pickle is read from the child, and
  a 7x7x1280 float16 layer costs one copy, not a pickle round trip;
- the child's stdin closing (the server died, even by ``kill -9``) ends the worker: no orphans.

The API is futures (``concurrent.futures.Future``; ``asyncio.wrap_future`` for a coroutine):
:meth:`QueryWorker.submit` never blocks the caller (the event loop) — validation, starting the
worker and writing the request happen on the client's sender thread. Answers resolve futures on
the client's reader thread: a Panel callback must hop back to its document
(``doc.add_next_tick_callback``, as :class:`hoverlay.explorer.session.Scheduler.in_thread` does).

Failures are typed, each with a ``public`` text that names no server path (for the browser;
``str()`` is the full text for the server log):

- :class:`~hoverlay.stores.uploads.UploadError`: the file is not a usable image (checked here,
  with the same validator the command line uses, before it is sent);
- :class:`ModelUnavailableError`: the store's model cannot be loaded on this server (weights
  missing, …); other stores keep working;
- :class:`QueryStoreError`: the store or a layer cannot be read;
- :class:`QueryBusyError`: :attr:`QueryWorkerConfig.queue` requests are already waiting;
- :class:`QueryTimeoutError`: no answer within the request's timeout (a request still queued
  when its time is up is skipped by the worker; one computing past ``timeout + kill_grace``
  gets the worker killed and restarted on the next request);
- :class:`WorkerFailedError`: the worker could not start here (e.g. no torch: ``pip install
  'hoverlay[build]'``) or died; the next request starts a new one.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Any

from hoverlay.errors import HoverlayError
from hoverlay.stores.query_wire import (
    EmbeddedImage,
    WireError,
    decode_embedding,
    read_message,
    write_message,
)
from hoverlay.stores.uploads import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    UploadError,
    validate_upload,
)

log = logging.getLogger(__name__)

WORKER_MODULE = "hoverlay.pipeline.query_worker"


# ==================================================================================== errors
_PATH = re.compile(r"(?:[a-z][a-z0-9+.-]*://|(?<![\w.])/)[^\s'\"(),;]*")


def public_text(message: str) -> str:
    """``message`` with every absolute path or URL cut to its last part (``/srv/w/r18.pt`` ->
    ``r18.pt``): what a browser may be shown of a server-side failure."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "…", message)


class QueryWorkerError(HoverlayError):
    """A query that the model worker did not answer with vectors."""

    @property
    def public(self) -> str:
        """The message without server paths, for a browser."""
        return public_text(str(self))


class ModelUnavailableError(QueryWorkerError):
    """The store's model cannot be loaded on this server (weights missing, another version)."""


class QueryStoreError(QueryWorkerError):
    """The store, or a layer asked for, cannot be read."""


class QueryBusyError(QueryWorkerError):
    """The worker's queue is full: try again in a moment."""


class QueryTimeoutError(QueryWorkerError, TimeoutError):
    """No answer within the request's timeout."""


class WorkerFailedError(QueryWorkerError):
    """The worker process could not start, or stopped."""


# ==================================================================================== config
@dataclass(frozen=True)
class QueryWorkerConfig:
    """How the worker runs; ``hoverlay serve``'s ``--query-*``/``--upload-*`` flags set these."""

    timeout: float = 30.0          # seconds from submit to answer, per request (model load included)
    queue: int = 8                 # requests waiting or computing, at most; more are refused
    start_timeout: float = 180.0   # seconds for the worker to import torch and say it is ready
    kill_grace: float = 10.0       # a request computing this long past its timeout: kill the worker
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None     # torch threads in the worker (default torch's: every core)
    python: str = sys.executable
    env: Mapping[str, str] = field(default_factory=dict)   # extra environment of the worker
    retry_after: float = 5.0       # a worker that failed to start is not retried sooner than this

    @classmethod
    def from_args(cls, args: Any) -> QueryWorkerConfig:
        """From parsed ``hoverlay serve`` arguments (:func:`explorer.options.add_serve_arguments`)."""
        given = {name: getattr(args, dest) for name, dest in (
            ("timeout", "query_timeout"), ("queue", "query_queue"), ("threads", "query_threads"),
            ("max_bytes", "upload_max_bytes"), ("max_pixels", "upload_max_pixels"))
            if getattr(args, dest, None) is not None}
        return cls(**given)


# ==================================================================================== client
@dataclass
class _Request:
    id: int
    header: dict[str, Any]
    data: bytes | None
    future: Future[Any]
    deadline: float
    timeout: float
    validate: bool = False
    sent: bool = False


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    stdin: IO[bytes]
    ready: threading.Event = field(default_factory=threading.Event)
    hello: dict[str, Any] = field(default_factory=dict)
    stderr_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    #: ids sent and not answered, oldest first (the worker answers in order)
    inflight: collections.OrderedDict[int, float] = field(default_factory=collections.OrderedDict)
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    dead: bool = False
    killed: bool = False


class QueryWorker:
    """A thread-safe client of one model worker process (started lazily)."""

    def __init__(self, config: QueryWorkerConfig | None = None):
        self.config = config or QueryWorkerConfig()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._outbox: queue.Queue[_Request | None] = queue.Queue()
        self._proc: _Process | None = None
        self._sender: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._closed = False
        self._start_failure: tuple[float, str] | None = None
        self._owner_pid = os.getpid()
        self.stats: dict[str, Any] = {"starts": 0, "start_seconds": None, "requests": 0, "answered": 0,
                                      "timeouts": 0, "refused_busy": 0, "kills": 0}

    # ------------------------------------------------------------------ public API
    def submit(self, image_bytes: bytes, store: str, layers: Sequence[str] | None = None, *,
               name: str = "the upload", storage_options: dict[str, Any] | None = None,
               timeout: float | None = None, validate: bool = True) -> Future[EmbeddedImage]:
        """Embed an image file's bytes with ``store``'s model: a future of an
        :class:`~hoverlay.stores.query_wire.EmbeddedImage` (pixels (S, S, 3) uint8 and, per layer
        of ``layers`` — default all of the store's — float16 (H, W, D) unit vectors and float32
        (H, W) norms, as the store holds them).

        Never blocks and never raises for a bad request: the future fails with one of the
        module's typed errors. ``name`` is how messages name the file (a client's file name).
        ``validate=False`` skips :func:`~hoverlay.stores.uploads.validate_upload` here when the
        caller has just run it (the worker decodes with the same checks anyway).
        """
        header = {"op": "embed", "store": str(store), "layers": None if layers is None else list(layers),
                  "name": name, "storage_options": storage_options,
                  "max_bytes": self.config.max_bytes, "max_pixels": self.config.max_pixels}
        return self._enqueue(header, bytes(image_bytes), timeout, validate)

    def warm(self, store: str, *, storage_options: dict[str, Any] | None = None,
             timeout: float | None = None) -> Future[dict[str, Any]]:
        """Start the worker if needed and load ``store``'s model: a future of
        ``{"load_seconds", "layers", "size", "model"}`` (or a typed error, e.g.
        :class:`ModelUnavailableError`)."""
        header = {"op": "load", "store": str(store), "storage_options": storage_options}
        return self._enqueue(header, None, timeout if timeout is not None else self.config.start_timeout,
                             False)

    def start(self) -> Future[dict[str, Any]]:
        """Start the worker now (in the background): a future of its ready message."""
        return self._enqueue({"op": "ping"}, None, self.config.start_timeout, False)

    def embed(self, image_bytes: bytes, store: str, layers: Sequence[str] | None = None,
              **kw: Any) -> EmbeddedImage:
        """:meth:`submit` and wait (scripts, tests; never on an event loop)."""
        return self.submit(image_bytes, store, layers, **kw).result()

    @property
    def running(self) -> bool:
        """A worker process is up and has said it is ready."""
        proc = self._proc
        return proc is not None and not proc.dead and proc.ready.is_set() and proc.popen.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.popen.pid if proc is not None and not proc.dead else None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (a ``stop`` frame, then SIGTERM/SIGKILL) and fail what is pending."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
            pending = list(self._pending.values())
            self._pending.clear()
            self._wake.notify_all()
        self._outbox.put(None)
        for req in pending:
            _fail(req.future, WorkerFailedError("the query worker was shut down"))
        if proc is not None:
            _stop_process(proc, timeout)

    # ------------------------------------------------------------------ internals
    def _enqueue(self, header: dict[str, Any], data: bytes | None, timeout: float | None,
                 validate: bool) -> Future[Any]:
        future: Future[Any] = Future()
        wait = float(timeout if timeout is not None else self.config.timeout)
        with self._lock:
            if self._closed:
                _fail(future, WorkerFailedError("the query worker was shut down"))
                return future
            if os.getpid() != self._owner_pid:
                _fail(future, WorkerFailedError("this QueryWorker belongs to another process (forked): "
                                                "use shared_worker() in each process"))
                return future
            if len(self._pending) >= self.config.queue:
                self.stats["refused_busy"] += 1
                _fail(future, QueryBusyError(f"the model worker is busy ({self.config.queue} queries "
                                             f"waiting): try again in a moment"))
                return future
            rid = next(self._ids)
            header = {**header, "id": rid}
            req = _Request(rid, header, data, future, time.monotonic() + wait, wait, validate)
            self._pending[rid] = req
            self.stats["requests"] += 1
            self._ensure_threads()
            self._wake.notify_all()
        self._outbox.put(req)
        return future

    def _ensure_threads(self) -> None:
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(target=self._send_loop, name="query-worker-sender", daemon=True)
            self._sender.start()
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch_loop, name="query-worker-watchdog",
                                              daemon=True)
            self._watchdog.start()

    def _resolve(self, rid: int, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            req = self._pending.pop(rid, None)
            if req is not None and error is None:
                self.stats["answered"] += 1
        if req is None:
            return  # timed out already
        if error is not None:
            _fail(req.future, error)
        else:
            _succeed(req.future, result)

    # sender thread ------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            req = self._outbox.get()
            if req is None:
                return
            with self._lock:
                if req.id not in self._pending:
                    continue  # timed out while queued
            if time.monotonic() > req.deadline:
                self._timeout(req.id)
                continue
            if req.validate and req.data is not None:
                try:
                    validate_upload(req.data, name=str(req.header.get("name")),
                                    max_bytes=self.config.max_bytes, max_pixels=self.config.max_pixels)
                except UploadError as exc:
                    self._resolve(req.id, error=exc)
                    continue
            try:
                proc = self._ensure_process()
            except WorkerFailedError as exc:
                self._resolve(req.id, error=exc)
                continue
            if req.header["op"] == "ping":
                self._resolve(req.id, dict(proc.hello))
                continue
            with self._lock:
                if req.id not in self._pending:
                    continue
                proc.inflight[req.id] = req.deadline
                req.sent = True
            try:
                with proc.write_lock:
                    write_message(proc.stdin, {**req.header, "deadline": req.deadline, "validated": req.validate},
                                  [req.data] if req.data is not None else [])
            except (OSError, ValueError):  # the worker died under us: the reader fails what it held
                self._process_died(proc)

    def _ensure_process(self) -> _Process:
        """The running worker, started (and waited for) if there is none."""
        with self._lock:
            proc = self._proc
            if proc is not None and not proc.dead:
                return proc
            failure = self._start_failure
            if failure is not None and time.monotonic() - failure[0] < self.config.retry_after:
                raise WorkerFailedError(failure[1])
        t = time.perf_counter()
        cmd = [self.config.python, "-m", WORKER_MODULE]
        if self.config.threads:
            cmd += ["--threads", str(self.config.threads)]
        try:
            popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **self.config.env}, close_fds=True)
        except OSError as exc:
            return self._start_failed(f"the model worker cannot start here: {exc}")
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        proc = _Process(popen, popen.stdin)
        threading.Thread(target=self._read_loop, args=(proc, popen.stdout), name="query-worker-reader",
                         daemon=True).start()
        threading.Thread(target=_drain_stderr, args=(proc, popen.stderr), name="query-worker-stderr",
                         daemon=True).start()
        if not proc.ready.wait(self.config.start_timeout) or proc.dead:
            _stop_process(proc, 1.0)
            tail = _last_error(proc)
            hint = " (pip install 'hoverlay[build]')" if "torch" in tail and "No module" in tail else ""
            why = tail or f"no ready message within {self.config.start_timeout:g} s"
            return self._start_failed(f"the model worker cannot start here: {why}{hint}")
        with self._lock:
            self._proc = proc
            self._start_failure = None
            self.stats["starts"] += 1
            self.stats["start_seconds"] = time.perf_counter() - t
            self.stats["worker_import_seconds"] = proc.hello.get("import_seconds")
        log.info("query worker %d ready in %.1f s", popen.pid, time.perf_counter() - t)
        return proc

    def _start_failed(self, message: str) -> _Process:
        with self._lock:
            self._start_failure = (time.monotonic(), message)
        log.warning("%s", message)
        raise WorkerFailedError(message)

    # reader thread -------------------------------------------------------------------
    def _read_loop(self, proc: _Process, stdout: IO[bytes]) -> None:
        try:
            while True:
                message = read_message(stdout)
                if message is None:
                    break
                header, blobs = message
                if header.get("op") == "ready":
                    proc.hello = header
                    proc.ready.set()
                    continue
                rid = header.get("id")
                if not isinstance(rid, int):
                    continue
                with self._lock:
                    proc.inflight.pop(rid, None)
                    self._wake.notify_all()
                if header.get("ok"):
                    if header.get("layers") is not None and "pixels" in header:
                        try:
                            self._resolve(rid, decode_embedding(header, blobs))
                        except (WireError, KeyError, TypeError, ValueError) as exc:
                            self._resolve(rid, error=WorkerFailedError(f"the model worker sent a bad answer: {exc}"))
                    else:
                        self._resolve(rid, {k: v for k, v in header.items() if k not in ("id", "ok")})
                else:
                    self._resolve(rid, error=_error_of(header))
        except (OSError, WireError) as exc:
            log.warning("query worker stream broke: %s", exc)
        self._process_died(proc)

    def _process_died(self, proc: _Process) -> None:
        """Fail what the dead worker held; the next request starts a new one."""
        with self._lock:
            if proc.dead:
                return
            proc.dead = True
            proc.ready.set()  # a start waiting for it gives up now
            held = list(proc.inflight)
            proc.inflight.clear()
            if self._proc is proc:
                self._proc = None
        code = proc.popen.poll()
        if code is None:
            _stop_process(proc, 1.0)
            code = proc.popen.poll()
        tail = _last_error(proc)
        if held:
            log.warning("query worker %d stopped (exit code %s) holding %d requests%s", proc.popen.pid, code,
                        len(held), f": {tail}" if tail else "")
        for rid in held:
            self._resolve(rid, error=WorkerFailedError(
                f"the model worker stopped (exit code {code}){': ' + tail if tail else ''}; the next "
                f"query starts a new one"))

    # watchdog thread -----------------------------------------------------------------
    def _watch_loop(self) -> None:
        """Fail requests past their deadline; kill a worker stuck on one (callbacks of the
        failed futures run outside the lock)."""
        while True:
            kill: _Process | None = None
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [r.id for r in self._pending.values() if r.deadline <= now]
                proc = self._proc
                if proc is not None and proc.inflight and not proc.killed:
                    oldest = next(iter(proc.inflight.values()))
                    if now > oldest + self.config.kill_grace:
                        proc.killed, kill = True, proc
                        self.stats["kills"] += 1
            for rid in expired:
                self._timeout(rid)
            if kill is not None:
                log.warning("query worker %d is over %g s past a request's timeout: killing it",
                            kill.popen.pid, self.config.kill_grace)
                kill.popen.kill()  # the reader sees the end and fails what it held
            with self._lock:
                if self._closed:
                    return
                deadlines = [r.deadline for r in self._pending.values()]
                proc = self._proc
                if proc is not None and proc.inflight and not proc.killed:
                    deadlines.append(next(iter(proc.inflight.values())) + self.config.kill_grace)
                if not deadlines:
                    self._wake.wait(60.0)
                else:
                    self._wake.wait(max(0.005, min(deadlines) - time.monotonic() + 0.001))

    def _timeout(self, rid: int) -> None:
        with self._lock:
            req = self._pending.get(rid)
            if req is None:
                return
            self.stats["timeouts"] += 1
            where = "while computing" if req.sent else "while waiting for the worker"
        self._resolve(rid, error=QueryTimeoutError(
            f"no answer from the model worker within {req.timeout:g} s ({where}); try again in a "
            f"moment, or with a smaller image"))


def _succeed(future: Future[Any], value: Any) -> None:
    if future.set_running_or_notify_cancel():
        future.set_result(value)


def _fail(future: Future[Any], error: BaseException) -> None:
    if future.set_running_or_notify_cancel():
        future.set_exception(error)


def _error_of(header: Mapping[str, Any]) -> BaseException:
    kind, message = header.get("kind"), str(header.get("message") or "the model worker failed")
    if kind == "upload":
        return UploadError(str(header.get("problem") or "truncated"), message)
    if kind == "model":
        return ModelUnavailableError(message)
    if kind == "store":
        return QueryStoreError(message)
    if kind == "expired":
        return QueryTimeoutError(message)
    return WorkerFailedError(f"the model worker failed: {message}")


def _drain_stderr(proc: _Process, stream: IO[bytes]) -> None:
    """The worker's stderr to this process's log, its last lines kept for error messages."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            proc.stderr_tail.append(line)
            log.info("query worker: %s", line)


def _last_error(proc: _Process) -> str:
    """The line of the worker's stderr that says why it failed (an exception's last line)."""
    time.sleep(0.05)  # let the stderr thread catch up with a process that just ended
    lines = [line for line in proc.stderr_tail if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else ""


def _stop_process(proc: _Process, timeout: float) -> None:
    popen = proc.popen
    if popen.poll() is None:
        # a sender blocked on a full pipe holds the lock: then skip the polite stop
        if proc.write_lock.acquire(timeout=0.5):
            try:
                write_message(proc.stdin, {"op": "stop"})
                proc.stdin.close()
            except (OSError, ValueError):
                pass
            finally:
                proc.write_lock.release()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.terminate()
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
    proc.dead = True


# ============================================================================ one per process
_SHARED: QueryWorker | None = None
_SHARED_LOCK = threading.Lock()
_SHARED_CONFIG = QueryWorkerConfig()


def configure_shared_worker(config: QueryWorkerConfig) -> None:
    """Set the config :func:`shared_worker` starts with (``hoverlay serve``, before serving); a
    shared worker made earlier with another config is stopped, and the next use makes a new one."""
    global _SHARED_CONFIG, _SHARED
    with _SHARED_LOCK:
        _SHARED_CONFIG = config
        old, _SHARED = _SHARED, None
    if old is not None:
        old.close(2.0)


def shared_worker_config() -> QueryWorkerConfig:
    """The config of this process's shared worker (its limits), without making the worker."""
    with _SHARED_LOCK:
        return _SHARED.config if _SHARED is not None and _SHARED._owner_pid == os.getpid() else _SHARED_CONFIG


def shared_worker() -> QueryWorker:
    """This process's :class:`QueryWorker`, created on first use; a forked server process
    (``--num-procs``) gets its own."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED._owner_pid != os.getpid():
            _SHARED = QueryWorker(_SHARED_CONFIG)
            atexit.register(_SHARED.close, 2.0)
        return _SHARED
