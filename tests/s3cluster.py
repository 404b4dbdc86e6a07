"""Real processes for the S3 and cluster tests: a moto S3 server and a forking launcher.

:class:`S3Server` is moto's standalone server (``moto_server``, the one s3fs's own tests use)
on 127.0.0.1 with one bucket, shared by every S3 test of a session (conftest's ``s3_server``).

:class:`Forker` is a "zygote": one interpreter that imports hoverlay, torch, distributed and
s3fs once (about 4 s of CPU, 8-10 s of wall time on a busy 2-core machine), then forks a
child for every ``hoverlay build`` the tests must run as a separate process — to SIGKILL it,
to pause the server under it, or to race it for a lock. Each child is a real process running
``hoverlay.cli.main(argv)`` (or a snippet of code) from a fresh fork, so a test pays for its
imports once per session instead of once per process. Children write stdout and stderr to a
log file that the test reads as it goes; the zygote reaps them (so a killed child's pid is
gone, as a killed build's is) and reports each exit status.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
BUCKET = "hoverlay"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not start (see its log)") from None
            time.sleep(0.05)


class S3Server:
    """A moto server process with the bucket ``hoverlay``; the credentials go to os.environ
    (as s3fs reads them), only the endpoint travels in the storage options."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.options = {"endpoint_url": self.endpoint}
        self._old_env = {k: os.environ.get(k) for k in CREDENTIALS}
        os.environ.update(CREDENTIALS)
        self._log = open(tmp / "moto.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(port, self.proc, "moto server")
        import s3fs

        # the tests' own reads: one GET per object (s3fs would size each with a HEAD first)
        self.fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, max_concurrency=1)
        self.fs.mkdir(BUCKET)

    def committed(self, store: str) -> int:
        """The store's committed count as its zarr.json says now (0: no store yet)."""
        path = store.removeprefix("s3://") + "/zarr.json"
        try:
            self.fs.invalidate_cache(path)
            return int(json.loads(self.fs.cat_file(path))["attributes"]["hoverlay"]["committed"])
        except (FileNotFoundError, KeyError, ValueError):
            return 0

    @contextmanager
    def paused(self) -> Any:
        """The server stopped (SIGSTOP): connections open, nothing answers; resumed on exit."""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        for k, v in self._old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Child:
    """A forked child: its pid, its log (stdout + stderr) and, once it ended, its exit code."""

    def __init__(self, forker: Forker, pid: int, log: Path):
        self.forker, self.pid, self.log = forker, pid, log

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for_line(self, pred: Any, timeout: float = 90) -> str | None:
        """The first log line with ``pred(line)``; None when the child ended (or timed out) first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self.forker.exit_code(self.pid) is not None
            for line in self.lines():
                if pred(line):
                    return line
            if ended:
                return None
            time.sleep(0.01)
        return None

    @property
    def rc(self) -> int | None:
        return self.forker.exit_code(self.pid)

    def wait(self, timeout: float = 120) -> int:
        return self.forker.wait(self.pid, timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


class Forker:
    """The zygote process (see the module); :meth:`spawn` forks a child of it."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None):
        self.tmp = tmp
        self._n = 0
        self._started: queue.Queue[int] = queue.Queue()
        self._ended: dict[int, int] = {}
        self._cond = threading.Condition()
        self._errors = open(tmp / "forker.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-c", "import s3cluster; s3cluster.zygote()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors,
                                     cwd=HERE, env={**os.environ, "PYTHONPATH": HERE, **(env or {})})
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            msg = json.loads(raw)
            if "ready" in msg:
                self._ready.set()
            elif "started" in msg:
                self._started.put(int(msg["started"]))
            elif "ended" in msg:
                with self._cond:
                    self._ended[int(msg["ended"])] = int(msg["rc"])
                    self._cond.notify_all()

    def spawn(self, argv: list[str] | None = None, code: str | None = None, args: Any = None,
              env: dict[str, str] | None = None, name: str = "child") -> Child:
        """Fork a child running ``hoverlay.cli.main(argv)`` or ``code`` (with ``ARGS = args``)."""
        if not self._ready.wait(180):
            raise RuntimeError(f"the forker did not start: {(self.tmp / 'forker.log').read_text()}")
        self._n += 1
        log = self.tmp / f"{self._n:02d}-{name}.log"
        req = {"argv": argv, "code": code, "args": args, "env": env or {}, "log": str(log)}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return Child(self, self._started.get(timeout=30), log)

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._ended.get(pid)

    def wait(self, pid: int, timeout: float = 120) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: pid in self._ended, timeout):
                raise TimeoutError(f"child {pid} still running after {timeout}s")
            return self._ended[pid]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the zygote kills what is left and exits
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._errors.close()


def _child(req: dict[str, Any]) -> None:
    """In a fresh fork: run the request with stdout/stderr to its log; never returns."""
    rc = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.environ.update(req["env"])
        if req["argv"] is not None:
            from hoverlay.cli import main

            rc = main(req["argv"])
        else:
            exec(compile(req["code"], "<child>", "exec"), {"__name__": "__child__", "ARGS": req["args"]})
            rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def zygote() -> None:
    """The forker's loop: import once, then one child per request line on stdin (see Forker)."""
    import distributed  # noqa: F401 - imported once here, for every child
    import s3fs  # noqa: F401
    import test_cluster  # noqa: F401 - the counted model the cluster tests build
    import torchvision  # noqa: F401 - load_model's tracing check imports it (6 s here)

    import hoverlay.cli  # noqa: F401
    import hoverlay.pipeline.build  # noqa: F401
    import hoverlay.pipeline.tasks  # noqa: F401
    import hoverlay.stores.lock  # noqa: F401
    import hoverlay.stores.urls  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    children: set[int] = set()
    buf = b""
    stdin = sys.stdin.fileno()
    open_ = True
    while open_ or children:
        if open_ and select.select([stdin], [], [], 0.02)[0]:
            data = os.read(stdin, 65536)
            if not data:
                open_ = False
                for pid in children:  # the session is over: nothing outlives it
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(line))
                children.add(pid)
                print(json.dumps({"started": pid}), flush=True)
        elif not open_:
            time.sleep(0.02)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            print(json.dumps({"ended": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)
