"""Start and stop real explorer server processes on 127.0.0.1 (benchmarks and tests share this).

Each server writes its log to a file so a caller can read what it printed while a test ran;
it runs in its own process group so that nothing it forks (``--num-procs`` workers) outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process, its base URL and its log file."""

    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    ready_path: str = "liveness"
    started: float = field(default_factory=time.monotonic)
    ready: bool = False

    def log(self, since: int = 0) -> str:
        return self.log_path.read_text(errors="replace")[since:]

    def errors(self) -> int:
        """ERROR lines and tracebacks in its log so far (what every benchmark row reports)."""
        text = self.log()
        return text.count("ERROR") + text.count("Traceback")

    def mark(self) -> int:
        """The log's length now: ``log(since=mark)`` is what was written after this call."""
        return len(self.log_path.read_text(errors="replace"))

    def wait(self, timeout: float = 120) -> Server:
        """Block until ``url + ready_path`` answers HTTP; raises with the log if the process died."""
        while not self.ready:
            try:
                urllib.request.urlopen(self.url + self.ready_path, timeout=5).read()
                self.ready = True
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - self.started > timeout:
                    self.stop()
                    raise RuntimeError(f"{self.name} server did not start:\n{self.log()}") from None
                time.sleep(0.2)
        return self

    def workers(self) -> list[Any]:
        """psutil processes forked by the server (``--num-procs``)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            return list(psutil.Process(self.proc.pid).children(recursive=True))
        return []

    def stop(self) -> None:
        """SIGTERM to the server process only (as ``kill PID`` does), then its whole group."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing of ours may outlive it
            os.killpg(self.proc.pid, signal.SIGKILL)


def launch(name: str, cmd: list[str], url: str, log_dir: Path | str, env: dict[str, str] | None = None,
           ready_path: str = "liveness") -> Server:
    """Start ``cmd`` (not waiting for it: call ``.wait()``), logging to ``log_dir/<name>.log``."""
    log_path = Path(log_dir) / f"{name}.log"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, proc, url, log_path, ready_path)


def serve_explorer(stores: list[str], *args: str, log_dir: Path | str, name: str = "explorer",
                   env: dict[str, str] | None = None, timeout: float = 120) -> Server:
    """``python -m hoverlay.explorer.serve STORES --port <free> ARGS``, started and answering."""
    port = free_port()
    cmd = [sys.executable, "-m", "hoverlay.explorer.serve", *stores, "--port", str(port), *args]
    return launch(name, cmd, f"http://127.0.0.1:{port}/", log_dir, env).wait(timeout)
