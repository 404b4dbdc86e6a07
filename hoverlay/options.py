"""Typed option declarations: one :class:`Option` gives the CLI flag, the Python keyword and
the config key, with its type, default and help.

Why one declaration: the flag, the keyword and the TOML key used to be three lists that
drifted (a config ``batch_size = "sixteen"`` passed through to a Dask task; ``index_memory =
"8G"`` failed late with a TypeError). Here every value — from a flag (text), a config file
(TOML types) or a Python call — goes through the same :meth:`OptionSet.resolve`, which refuses a
bad value *before any work*, with an :class:`OptionError` naming the key, the value and the
expected type (exit 2), and answers an unknown key with the closest known one.

This is a leaf module (standard library only): the pipeline and the explorer declare their
options with it, and the command line builds its parsers from those declarations.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

#: Where a value came from, as its messages name it.
FLAG, CONFIG, KEYWORD = "flag", "config key", "keyword"


class OptionError(UsageError):
    """A value of the wrong type or range, or an unknown option name (exit 2)."""


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to a misspelt one (difflib), or None when none is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return match[0] if match else None


# ----------------------------------------------------------------------------------- kinds
class Kind:
    """A value type: parses flag text and checks config/Python values; ``expected`` names it."""

    expected = "a value"

    def from_text(self, text: str) -> Any:
        return self.from_value(text)

    def from_value(self, value: Any) -> Any:
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.expected})"


class _Invalid(ValueError):
    """Raised by a kind; :meth:`Option.coerce` turns it into an :class:`OptionError`."""


@dataclass(frozen=True, repr=False)
class Integer(Kind):
    minimum: int | None = 1

    @property
    def expected(self) -> str:  # type: ignore[override]
        if self.minimum == 1:
            return "a positive integer"
        return "an integer" if self.minimum is None else f"an integer >= {self.minimum}"

    def from_text(self, text: str) -> int:
        try:
            return self.from_value(int(text.strip()))
        except ValueError:
            raise _Invalid from None

    def from_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid
        if self.minimum is not None and value < self.minimum:
            raise _Invalid
        return value


@dataclass(frozen=True, repr=False)
class Number(Kind):
    """A real number > ``above`` (integers are taken too)."""

    above: float = 0.0

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a positive number" if self.above == 0 else f"a number > {self.above:g}"

    def from_text(self, text: str) -> float:
        try:
            return self.from_value(float(text.strip()))
        except ValueError:
            raise _Invalid from None

    def from_value(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > self.above:
            raise _Invalid
        return float(value)


@dataclass(frozen=True, repr=False)
class Text(Kind):
    """A string, optionally one of ``choices`` or matching ``pattern`` (``described`` names it)."""

    choices: tuple[str, ...] = ()
    pattern: str | None = None
    described: str | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        if self.described:
            return self.described
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return "a non-empty string"

    def from_value(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid
        value = value.strip()
        if self.choices and value in self.choices:
            return value
        if self.pattern and re.fullmatch(self.pattern, value):
            return value
        if self.choices or self.pattern:
            raise _Invalid
        return value


class TextList(Kind):
    """Names: a comma-separated string (flags) or a list of strings (config, Python)."""

    expected = "a comma-separated list of names (or a list of strings)"

    def from_value(self, value: Any) -> list[str]:
        if isinstance(value, str):
            items = [s.strip() for s in value.split(",")]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            items = [s.strip() for s in value]
        else:
            raise _Invalid
        items = [s for s in items if s]
        if not items:
            raise _Invalid
        return items


class Switch(Kind):
    expected = "true or false"

    def from_text(self, text: str) -> bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise _Invalid

    def from_value(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Invalid
        return value


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ByteSize(Kind):
    """Bytes: an integer, or a string such as ``8G``, ``512M``, ``1.5GiB``."""

    expected = "a size in bytes such as 8G, 512M or 1000000"

    def from_value(self, value: Any) -> int:
        if isinstance(value, bool):
            raise _Invalid
        if isinstance(value, int):
            if value <= 0:
                raise _Invalid
            return value
        if not isinstance(value, str):
            raise _Invalid
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", value.lower())
        if not m:
            raise _Invalid
        size = int(float(m[1]) * _UNITS[m[2] or ""])
        if size <= 0:
            raise _Invalid
        return size


class JsonObject(Kind):
    """A JSON object (flags: its text; config: a TOML table; Python: a dict)."""

    expected = 'a JSON object such as {"endpoint_url": "http://127.0.0.1:9000"}'

    def from_text(self, text: str) -> dict[str, Any]:
        try:
            return self.from_value(json.loads(text))
        except ValueError:
            raise _Invalid from None

    def from_value(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Invalid
        return dict(value)


class Path(Kind):
    """A local path or URL (also an ``os.PathLike``), or a list of them where ``many``."""

    def __init__(self, many: bool = False):
        self.many = many

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "a path or URL" + (" (or a list of them)" if self.many else "")

    def from_value(self, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str) and value.strip():
            return value
        if self.many and isinstance(value, (list, tuple)) and value:
            return [self.from_value(v) for v in value]
        raise _Invalid


# --------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One option: ``name`` is the Python keyword and the config key; ``flag`` the CLI flag."""

    name: str
    kind: Kind
    help: str
    default: Any = None
    flag: str = ""           # default: --name-with-dashes
    short: str | None = None
    #: a Switch whose default is True is given on the command line as its negation (--no-index),
    #: with its own help text
    negative_flag: str | None = None
    negative_help: str | None = None
    metavar: str | None = None
    cli: bool = True          # False: Python and config only (e.g. test hooks)

    def __post_init__(self) -> None:
        if not self.flag:
            object.__setattr__(self, "flag", "--" + self.name.replace("_", "-"))

    @property
    def flag_help(self) -> str:
        return (self.negative_help or self.help) if self.negative_flag else self.help

    @property
    def argparse_help(self) -> str:
        """:attr:`flag_help` with the default, for argparse (which reads ``%`` as a format)."""
        text = self.flag_help
        if self.default is not None and not isinstance(self.kind, Switch):
            text += f" (default: {self.default})"
        return text.replace("%", "%%")

    @property
    def key_text(self) -> str:
        """How the config key / keyword reads in docs: ``batch_size`` (a positive integer, 16)."""
        default = "" if self.default is None else f"; default {self.default!r}".replace("'", "")
        return f"`{self.name}` ({self.kind.expected}{default})"

    @property
    def flags(self) -> list[str]:
        """The flags that set this option on the command line."""
        main = self.negative_flag or self.flag
        return [main] + ([self.short] if self.short else [])

    def coerce(self, value: Any, source: str = KEYWORD) -> Any:
        """``value`` checked (and parsed, for flag text) or an :class:`OptionError`."""
        try:
            if source == FLAG and isinstance(value, str):
                return self.kind.from_text(value)
            return self.kind.from_value(value)
        except _Invalid:
            where = {FLAG: self.flags[0], CONFIG: f"config key {self.name}",
                     KEYWORD: f"keyword {self.name}"}[source]
            raise OptionError(f"{where}: {value!r} is not {self.kind.expected}") from None


@dataclass(frozen=True)
class OptionSet:
    """The options of one command (``hoverlay build``, ``build()``, the config file)."""

    options: tuple[Option, ...]
    by_name: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {o.name: o for o in self.options})

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def unknown(self, name: str, source: str) -> OptionError:
        known = self.names if source != FLAG else [f for o in self.options if o.cli for f in o.flags]
        near = closest(name, known)
        what = {FLAG: "unknown flag", CONFIG: "unknown config key", KEYWORD: "unknown keyword"}[source]
        hint = f"; did you mean {near}?" if near else f"; known: {', '.join(sorted(known))}"
        return OptionError(f"{what} {name!r}{hint}")

    def check(self, values: Mapping[str, Any], source: str = KEYWORD) -> dict[str, Any]:
        """Validate given values (None means "not given" and is dropped); unknown names refused."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            option = self.by_name.get(name)
            if option is None:
                raise self.unknown(name, source)
            if value is not None:
                out[name] = option.coerce(value, source)
        return out

    def resolve(self, *layers: tuple[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Every option's value: defaults, then each (source, values) layer in order (later wins)."""
        out = self.defaults()
        for source, values in layers:
            out.update(self.check(values, source))
        return out

    # ----------------------------------------------------------------- command line
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """One argparse flag per option; values stay text (``FLAG`` source) until :meth:`resolve`."""
        for o in self.options:
            if not o.cli:
                continue
            if isinstance(o.kind, Switch):
                const = not bool(o.default) if o.negative_flag else True
                parser.add_argument(*o.flags, dest=o.name, action="store_const", const=const,
                                    default=None, help=o.argparse_help)
            else:
                parser.add_argument(*o.flags, dest=o.name, default=None, help=o.argparse_help,
                                    metavar=o.metavar or o.name.upper())

    def from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """The flags actually given (argparse defaults are None)."""
        return {o.name: getattr(args, o.name) for o in self.options
                if o.cli and getattr(args, o.name, None) is not None}

    def table(self) -> list[str]:
        """Markdown rows ``| flags | key (type; default) | help |``, as the README lists them."""
        return [f"| `{', '.join(o.flags)}` | {o.key_text} | {o.flag_help} |" for o in self.options if o.cli]


#: ``--storage-options JSON``: one declaration for every command that opens a store or images.
STORAGE_OPTIONS = Option("storage_options", JsonObject(), "fsspec options for store and image URLs "
                         'as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' (credentials '
                         "are best left to the environment, as fsspec reads them)", metavar="JSON")


# ------------------------------------------------------------------------------ config files
def load_config(path: str | os.PathLike[str], options: OptionSet,
                reserved: Sequence[str] = ()) -> dict[str, Any]:
    """A TOML file's keys (``-`` read as ``_``), each checked against ``options``.

    ``reserved`` names keys that are not options of the file (e.g. ``config`` itself).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise OptionError(f"config file {where!r} not found") from None
    except IsADirectoryError:
        raise OptionError(f"config file {where!r} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"config file {where!r} is not valid TOML: {exc}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    bad = [k for k in data if k in reserved]
    if bad:
        raise OptionError(f"config file {where!r}: key {bad[0]!r} cannot be set in a config file")
    try:
        return options.check(data, CONFIG)
    except OptionError as exc:
        raise OptionError(f"config file {where!r}: {exc}") from None

