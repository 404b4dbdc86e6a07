"""The one table of exit codes, and the base class every expected failure derives from.

An *expected* failure is one a user can fix (a typo, a missing file, weights not downloaded,
another build holding the lock): it is a :class:`HoverlayError` whose class says which exit
code it ends the command with, and the command line prints its message as one line. Anything
else is a bug and ends with :data:`EXIT_ERROR` (the traceback only with ``--verbose``).

This module imports nothing of hoverlay: ``stores``, ``pipeline`` and ``explorer`` all build
their errors on it, and the README's exit-code table is :data:`EXIT_CODES` (a test checks).
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INPUT = 4
EXIT_INTERRUPTED = 130

#: exit code -> what it means (the README's table).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (images that failed to decode are listed in the summary and the table, not fatal)",
    EXIT_ERROR: "the system refused (disk full, permission denied: the message says which file), or "
                "an unexpected error, a bug (rerun with `--verbose` for the traceback)",
    EXIT_USAGE: "bad usage: unknown flag, bad option value or config file",
    EXIT_LOCKED: "the store is locked by another build",
    EXIT_INPUT: "bad model, weights, layer, image source, URL or store (another model, not a store, "
                "newer format, corrupt), or a missing optional package",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the last commit is intact, rerun to resume",
}


class HoverlayError(Exception):
    """An expected failure: its message says what is wrong and what to do; no traceback."""

    exit_code: ClassVar[int] = EXIT_ERROR


class UsageError(HoverlayError, ValueError):
    """A flag, option value or config file the command cannot take."""

    exit_code = EXIT_USAGE


class InputError(HoverlayError):
    """Something the command was pointed at (model, weights, images, store, URL) is unusable."""

    exit_code = EXIT_INPUT


class MissingDependencyError(InputError, ImportError):
    """An optional package a URL or feature needs is not installed; the message names the extra."""
