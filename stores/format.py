"""The store format, version 3: names, dtypes, dimension names and the root attributes schema.

This module is the single source of truth for the layout described in
``docs/store-format.md``; writer and reader both import their names from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptStoreError, FormatVersionError, NotAStoreError
from .geometry import LayerGeometry
from .pixels import LEGACY_PIXEL_CODEC, PixelCodec

FORMAT_NAME = "hoverlay"
#: 3: pixels may be stored with an image codec (JPEG, WebP, AVIF: :mod:`stores.pixels`), named
#: with its quality in the root attributes (``pixels``); a hoverlay that reads 1..2 only would
#: fail on such a chunk with a Zarr codec error, so it is told to upgrade instead.
#: 2: string columns also as UTF-8 bytes + end offsets (core Zarr types, which tensorstore and
#: other Zarr v3 readers read), and every array has Zarr ``dimension_names``. 1: string columns
#: as zarr-python's ``string`` data type only. Readers read all three; a writer keeps a store's own.
FORMAT_VERSION = 3
#: The first version whose string columns have UTF-8 companions (``<column>.utf8``/``.ends``).
STRING_UTF8_SINCE = 2
#: The first version whose root attributes name the pixel codec (older ones: zstd on raw bytes).
PIXEL_CODEC_SINCE = 3

PIXELS = "images/pixels"
TABLE = "images/table"
#: The user's own columns (``build --metadata``): one array per column, a row per image.
METADATA = "images/metadata"
#: Kinds a metadata column may have: text ("" where missing) or numbers (NaN where missing).
METADATA_KINDS = ("str", "float64")
LAYERS = "layers"
INDEX_DIR = "index"

#: Columns of ``images/table``: name -> numpy dtype kind ("str", "int64", "float32").
TABLE_COLUMNS: dict[str, str] = {
    "source": "str",          # uri the image was read from
    "label": "str",           # e.g. parent folder name
    "hash": "str",            # sha256 of the file bytes (+ transform suffix for derived copies)
    "base_id": "int64",       # image id of the untransformed image, -1 for originals
    "transform": "str",       # none | rotate | scale
    "param": "float32",       # rotation angle in degrees or scale factor; 0 for none
    "status": "str",          # ok | failed
    "reason": "str",          # why a failed image failed, "" otherwise
}

#: Zarr v3 ``dimension_names`` of every array (docs/store-format.md, "Dimension names").
#: ``y``/``x`` mean pixel rows/columns in ``images/`` and patch rows/columns in ``layers/<layer>/``:
#: each layer is its own group, so xarray sees each layer's (H, W) as its own dimensions.
IMAGE_DIM = "image"
PIXELS_DIMS = (IMAGE_DIM, "y", "x", "rgb")
VECTORS_DIMS = (IMAGE_DIM, "y", "x", "channel")
NORMS_DIMS = (IMAGE_DIM, "y", "x")
TABLE_DIMS = (IMAGE_DIM,)

#: Since version 2 a string column ``<column>`` (zarr-python's ``string`` data type, which
#: xarray and zarr-python read) has two companions of core Zarr types that any Zarr v3 reader
#: (tensorstore among them) reads: ``<column>.utf8``, uint8, the UTF-8 bytes of every row one
#: after the other, and ``<column>.ends``, int64 (N,), where row i's bytes end (exclusive;
#: row i is ``utf8[ends[i-1]:ends[i]]``, ``ends[-1]`` taken as 0; -1 = not written yet).
UTF8_SUFFIX = ".utf8"
ENDS_SUFFIX = ".ends"

STATUS_OK = "ok"
STATUS_FAILED = "failed"
TRANSFORM_KINDS = ("none", "rotate", "scale")


def layer_path(layer: str, array: str) -> str:
    """Path of one array (``vectors``, ``norms``, ``groups``) of a layer inside the group."""
    return f"{LAYERS}/{encode_layer(layer)}/{array}"


def encode_layer(layer: str) -> str:
    """Layer node names (``features.3.1``) are valid Zarr names as they are, except '/'."""
    return layer.replace("/", "__")


@dataclass
class StoreAttrs:
    """Root attributes of a store (``zarr.json`` -> ``attributes.hoverlay``)."""

    model: dict[str, Any]
    preprocessing: dict[str, Any]
    image_size: int
    layers: dict[str, LayerGeometry]
    chunk: int
    committed: int = 0
    created: str = ""
    updated: str = ""
    tool_version: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: metadata column -> kind (:data:`METADATA_KINDS`), in the order the file had them
    metadata: dict[str, str] = field(default_factory=dict)
    #: how ``images/pixels`` is encoded (format 3); zstd on raw bytes for older stores
    pixels: PixelCodec = LEGACY_PIXEL_CODEC

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "model": self.model,
            "preprocessing": self.preprocessing,
            "image_size": self.image_size,
            "layers": {name: g.as_dict() for name, g in self.layers.items()},
            "chunk": self.chunk,
            "committed": self.committed,
            "created": self.created,
            "updated": self.updated,
            "extra": self.extra,
            "metadata": self.metadata,
        }
        if self.format_version >= PIXEL_CODEC_SINCE:
            out["pixels"] = self.pixels.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> StoreAttrs:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise NotAStoreError(f"{where!r} is a Zarr group but not a hoverlay store "
                                 f"(no '{FORMAT_NAME}' attributes)")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise FormatVersionError(
                f"{where!r} has format_version {version!r}; this hoverlay reads versions "
                f"1..{FORMAT_VERSION} — upgrade hoverlay to open it")
        committed = data.get("committed")
        if isinstance(committed, bool) or not isinstance(committed, int) or committed < 0:
            raise CorruptStoreError(f"{where!r} has committed = {committed!r} in its zarr.json; it must "
                                    f"be a count of images (an integer >= 0): the root document is damaged")
        return cls(
            model=data["model"],
            preprocessing=data["preprocessing"],
            image_size=int(data["image_size"]),
            layers={k: LayerGeometry(**v) for k, v in data["layers"].items()},
            chunk=int(data["chunk"]),
            committed=committed,
            created=data.get("created", ""),
            updated=data.get("updated", ""),
            tool_version=data.get("tool_version", ""),
            format_version=version,
            extra=data.get("extra", {}),
            metadata=_metadata_kinds(data.get("metadata", {}), where),
            pixels=_pixel_codec(data, version, where),
        )


def _metadata_kinds(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and "/" not in k and v in METADATA_KINDS for k, v in value.items()):
        raise CorruptStoreError(f"{where!r} has metadata = {value!r} in its zarr.json; it must map "
                                f"column names to one of {METADATA_KINDS}: the root document is damaged")
    return dict(value)


def _pixel_codec(data: dict[str, Any], version: int, where: str) -> PixelCodec:
    if version < PIXEL_CODEC_SINCE:
        return LEGACY_PIXEL_CODEC
    try:
        return PixelCodec.from_json(data.get("pixels"))
    except ValueError as exc:
        raise CorruptStoreError(f"{where!r} has pixels = {data.get('pixels')!r} in its zarr.json ({exc}): "
                                f"the root document is damaged") from None


def metadata_path(column: str) -> str:
    """Path of one metadata column's array (its companions, for text, beside it)."""
    return f"{METADATA}/{column}"
