"""Config files for scheduled runs: every key is a keyword of :func:`pipeline.build.build`.

TOML, e.g.::

    images = "s3://bucket/photos/"
    store = "s3://bucket/hoverlay.zarr"
    layers = ["_blocks.4.add", "_blocks.10.add"]
    quiet = true

Command-line flags override keys from the file.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A config file that cannot be read or has keys build() does not take."""


def build_keywords() -> set[str]:
    from .build import build

    return {name for name, p in inspect.signature(build).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from exc
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = set(data) - build_keywords()
    if unknown:
        raise ConfigError(f"config file {os.fspath(path)!r} has unknown key(s) {sorted(unknown)}; "
                          f"known: {sorted(build_keywords())}")
    return data


def merge(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line (not None) win over the file."""
    return config | {k: v for k, v in overrides.items() if v is not None}
