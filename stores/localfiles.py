"""Local files a store writes beside Zarr (index, re-rank rows): created like Zarr's own files.

``tempfile.mkstemp`` creates files readable by their owner only (0600), while Zarr's chunks
follow the umask (0644 under the usual 022): a server running as another user (as
deploy/hoverlay-serve.service does) could read the vectors but not the index, and top-k failed
with "Permission denied". Temporary files renamed into a store get the umask's mode instead.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def umask() -> int:
    """The process umask, read without changing it (other threads may be creating files)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file_in(folder: str, suffix: str = "") -> tuple[int, str]:
    """(fd, path) of a new temporary file in ``folder`` with the mode a new file there would get."""
    fd, path = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, path
