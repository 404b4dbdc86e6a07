"""A terminal progress line with images/s, silent in quiet mode (cron) and when not a TTY."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None, width: int = 30):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.width = width
        self.total = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        if not self.quiet and total:
            self._draw()

    def update(self, n: int) -> None:
        self.done += n
        if not self.quiet:
            self._draw()

    def note(self, message: str) -> None:
        if not self.quiet:
            self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")

    def _draw(self) -> None:
        elapsed = max(1e-9, time.perf_counter() - self.t0)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width)
        line = f"[{bar:<{self.width}}] {self.done}/{self.total} images  {rate:.1f} img/s"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if not self.quiet and self.tty and self.total:
            self.stream.write("\n")
