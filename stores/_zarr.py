"""Opening Zarr groups by local path or fsspec URL, with hoverlay's error messages."""

from __future__ import annotations

import os
from typing import Any

import zarr
import zarr.errors

from .errors import NotAStoreError
from .format import FORMAT_NAME, StoreAttrs


def normalize_url(url: str | os.PathLike[str]) -> str:
    """Local paths become absolute strings; fsspec URLs (``s3://``, ``memory://``) pass through."""
    text = os.fspath(url)
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def open_root(url: str, mode: str = "r", storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Open the root group of an existing store; :class:`NotAStoreError` names the path otherwise."""
    kwargs: dict[str, Any] = {}
    if storage_options and not is_local(url):
        kwargs["storage_options"] = storage_options
    try:
        group = zarr.open_group(url, mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise NotAStoreError(f"{url!r} is not a hoverlay store (no Zarr v3 group there)") from exc
    except (ValueError, KeyError) as exc:  # e.g. a Zarr v2 array or a plain directory of files
        raise NotAStoreError(f"{url!r} is not a hoverlay store: {exc}") from exc
    return group


def read_attrs(group: zarr.Group, url: str) -> StoreAttrs:
    return StoreAttrs.from_json(dict(group.attrs).get(FORMAT_NAME, {}), url)
