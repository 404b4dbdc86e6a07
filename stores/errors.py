"""Errors raised by the store layer.

Every error names the bad value so that a user reading the one-line message (or the
explorer's message box) knows what to fix without reading code. All are expected failures
(:class:`hoverlay.errors.HoverlayError`): the command line prints the message and exits with
the class's code (4, or 3 for a locked store), never a traceback.
"""

from __future__ import annotations

from hoverlay.errors import EXIT_LOCKED, InputError


class StoreError(InputError):
    """Base class for every error raised by :mod:`hoverlay.stores`."""


class NotAStoreError(StoreError, FileNotFoundError):
    """The path exists but is not a hoverlay store (or does not exist)."""


class FormatVersionError(StoreError):
    """The store was written by a newer (or unknown) format version."""


class UnknownLayerError(StoreError, KeyError):
    """A layer name that the store (or model) does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(StoreError, IndexError):
    """An image id, patch id or (y, x) coordinate outside the committed store."""


class IndexBudgetError(StoreError, ValueError):
    """An index memory budget (``--index-memory``) below the smallest index the ladder can build
    for a layer; the message names the budget and the smallest one that works. Raised by
    ``hoverlay build`` before its first write."""


class StoreMismatchError(StoreError, ValueError):
    """An append whose model, preprocessing or layers differ from the store's."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""

    exit_code = EXIT_LOCKED


class BadURLError(StoreError, ValueError):
    """A location whose scheme or storage options no filesystem takes."""


class CorruptStoreError(StoreError):
    """The store's own records disagree (e.g. ``committed`` beyond the arrays): never read as data."""
