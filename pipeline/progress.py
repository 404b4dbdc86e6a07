"""Progress of every long phase of a build: a tqdm bar on a terminal, periodic lines elsewhere.

A build has phases of very different lengths (hashing 10k files, embedding them, training,
adding to and tuning each index: minutes each at 10M vectors). Each phase is a :class:`Phase`
with a count, a rate and an ETA, updated as work finishes (per forward batch, per index block),
from any thread. On a terminal it is a tqdm bar; when the stream is not a terminal (cron, a log
file, CI) it is a plain line every ``interval`` seconds and one when the phase ends, so a log
has a record without a line per redraw. ``quiet`` silences bars, lines and notes; the
build's summary line is not progress and is printed either way.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from tqdm import tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, ETA {remaining}"
OPEN_FORMAT = "{desc}: {n_fmt}{unit}, {rate_fmt}, elapsed {elapsed}"


class Phase:
    """One counted phase. ``update(n)`` is thread-safe; ``close()`` ends it (idempotent)."""

    def __init__(self, reporter: ProgressReporter, name: str, total: int | None, unit: str):
        self.reporter, self.name, self.total, self.unit = reporter, name, total, unit
        self.done = 0
        self.t0 = time.perf_counter()
        self._last_line = self.t0
        self._lock = threading.Lock()
        self._closed = False
        self._bar: Any = None
        if reporter.enabled and reporter.tty:
            self._bar = tqdm(total=total, desc=name, unit=f" {unit}", file=reporter.stream,
                             dynamic_ncols=True, leave=True, mininterval=0.2)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.reporter.enabled and time.perf_counter() - self._last_line >= self.reporter.interval:
                self._write_line()

    def _write_line(self) -> None:
        self._last_line = time.perf_counter()
        fmt = LINE_FORMAT if self.total else OPEN_FORMAT
        line = tqdm.format_meter(self.done, self.total, self.elapsed, prefix=self.name,
                                 unit=" " + self.unit, bar_format=fmt)
        self.reporter.write(line)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.reporter.enabled:
                self._write_line()

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressReporter:
    """Where phases and notes go: ``stream`` (stderr), as bars when it is a terminal."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, interval: float = 10.0,
                 tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = not quiet
        self.interval = float(interval)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self._lock = threading.Lock()

    def phase(self, name: str, total: int | None = None, unit: str = "images") -> Phase:
        return Phase(self, name, total, unit)

    def write(self, line: str) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        """A message between the bars (a failed image, the dashboard link); quiet drops it too."""
        if not self.enabled:
            return
        if self.tty:
            tqdm.write(message, file=self.stream)
        else:
            self.write(message)


#: For library calls that want no output at all.
SILENT = ProgressReporter(quiet=True, tty=False)
