"""Where a build's time goes: seconds per phase, summed over a build's tasks.

Each task keeps its own :class:`PhaseClock` (wall seconds of the thread that ran it) and returns
it with its rows, so the same numbers come back from threads and from Dask workers. Phases of
different threads overlap: their sum is CPU-ish work, not the build's elapsed time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

#: What a phase is timed with: wall seconds. ``bench.pipeline`` swaps in ``time.process_time``
#: for a ``scheduler="sync"`` build, where one task runs at a time, so that each phase's CPU
#: seconds (its Zarr and torch helper threads included) come out right on a loaded machine.
CLOCK: Callable[[], float] = time.perf_counter

#: The phases, in the order a task meets them (docs/performance.md, "Where a build's time goes").
PHASES = (
    "hash",           # reading every file once and its sha256 (the phase before embedding)
    "open",           # a task's model and the store's arrays: cached per process, ~0 unless it
                      # waits (it waited for the other thread's forwards: issue #16)
    "read",           # the file's bytes (local file or fsspec URL)
    "decode",         # JPEG/PNG/… -> RGB (draft-mode JPEG decoding for large photos)
    "resize",         # shorter side to S (bicubic), centre crop
    "transform",      # rotated / rescaled copies
    "forward",        # the model (pixel normalisation and the forward pass)
    "normalize",      # channels last, L2 norms, float16 unit vectors
    "write_pixels",   # the pixel codec and the pixels' shard files
    "write_vectors",  # blosc-zstd of vectors and norms and their shard files
    "table",          # table rows, metadata columns and the commit (client)
    "dask",           # elapsed embedding time no task accounts for (scheduling, waiting)
)


class PhaseClock:
    """Seconds per phase for one task (not shared between threads)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        clock = CLOCK
        t = clock()
        try:
            yield
        finally:
            self.add(phase, clock() - t)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def add_phases(total: dict[str, float], part: Mapping[str, float]) -> None:
    """Add one task's seconds to a build's."""
    for phase, s in part.items():
        total[phase] = total.get(phase, 0.0) + s
