"""``quotamem://``: fsspec's in-memory filesystem with a byte quota, for out-of-space tests.

A real fsspec filesystem (zarr writes through it exactly as through s3:// or gcs://) that
raises ``OSError(ENOSPC)`` once stored bytes would exceed ``quota``, the way a full disk or a
bucket quota does. It needs no root, unlike a small tmpfs.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem


class _QuotaFile(MemoryFile):
    def commit(self) -> None:
        self.fs.check_space(self.path, len(self.getbuffer()))
        super().commit()


class QuotaMemoryFileSystem(MemoryFileSystem):
    protocol = "quotamem"
    store: ClassVar[dict[str, Any]] = {}  # its own files, apart from memory://
    pseudo_dirs: ClassVar[list[str]] = [""]
    quota: ClassVar[int] = 1 << 62

    def used(self) -> int:
        return sum(len(f.getbuffer()) for f in self.store.values())

    def check_space(self, path: str, size: int) -> None:
        old = self.store.get(self._strip_protocol(path))
        if self.used() - (len(old.getbuffer()) if old is not None else 0) + size > self.quota:
            raise OSError(errno.ENOSPC, f"No space left on device (quota {self.quota} bytes)", path)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        self.check_space(path, len(value))
        super().pipe_file(path, value, *args, **kwargs)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        if "w" in mode or "a" in mode:
            f.__class__ = _QuotaFile  # same object, quota checked when the write is committed
        return f


fsspec.register_implementation("quotamem", QuotaMemoryFileSystem, clobber=True)
