"""Opening Zarr groups by local path or fsspec URL, with hoverlay's error messages."""

from __future__ import annotations

from typing import Any, Literal

import zarr
import zarr.errors

from .errors import CorruptStoreError, NotAStoreError
from .format import (
    ENDS_SUFFIX,
    FORMAT_NAME,
    PIXELS,
    STRING_UTF8_SINCE,
    TABLE,
    TABLE_COLUMNS,
    StoreAttrs,
    layer_path,
)
from .urls import ensure_filesystem, is_local, storage_options_for


def array(group: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path`` of a store group (a group there means a damaged store)."""
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise NotAStoreError(f"{path!r} in the store is a group, not an array")
    return node


def open_root(url: str, mode: Literal["r", "r+", "a", "w", "w-"] = "r", storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """Open the root group of an existing store; :class:`NotAStoreError` names the path otherwise."""
    ensure_filesystem(url)
    kwargs: dict[str, Any] = {}
    options = None if is_local(url) else storage_options_for(url, storage_options, small_objects=True)
    if options:
        kwargs["storage_options"] = options
    try:
        group = zarr.open_group(url, mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as exc:
        raise NotAStoreError(f"{url!r} is not a hoverlay store (no Zarr v3 group there)") from exc
    except (ValueError, KeyError) as exc:  # e.g. a Zarr v2 array or a plain directory of files
        raise NotAStoreError(f"{url!r} is not a hoverlay store: {exc}") from exc
    return group


def read_attrs(group: zarr.Group, url: str) -> StoreAttrs:
    """The root attributes, with ``committed`` checked against the arrays it publishes rows of."""
    data = dict(group.attrs).get(FORMAT_NAME, {})
    attrs = StoreAttrs.from_json(data if isinstance(data, dict) else {}, url)
    check_committed(group, url, attrs)
    return attrs


def check_committed(group: zarr.Group, url: str, attrs: StoreAttrs) -> None:
    """Every per-image array must hold at least ``committed`` rows: a larger ``committed`` (a
    damaged or hand-edited zarr.json) would otherwise read missing rows as fill values — zeros —
    and an append would write phantom rows after them."""
    paths = [PIXELS, *(f"{TABLE}/{c}" for c in TABLE_COLUMNS)]
    if attrs.format_version >= STRING_UTF8_SINCE:  # a string column's ends are per image too
        paths += [f"{TABLE}/{c}{ENDS_SUFFIX}" for c, kind in TABLE_COLUMNS.items() if kind == "str"]
    for layer in attrs.layers:
        paths += [layer_path(layer, "vectors"), layer_path(layer, "norms")]
    for path in paths:
        try:
            rows = array(group, path).shape[0]
        except KeyError:
            raise CorruptStoreError(f"{url!r} lacks the array {path!r}: the store is damaged") from None
        if rows < attrs.committed:
            raise CorruptStoreError(
                f"{url!r} says {attrs.committed} images are committed, but {path} holds {rows} rows: "
                f"its zarr.json is damaged (restore it, or set committed to at most {rows})")
