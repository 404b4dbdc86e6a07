"""A FiftyOne dataset of a store's source images, with patch hits as detections.

One sample per committed ok original image (rotated or rescaled copies have no source file of
their own) whose source is a local file: ``filepath`` the source, ``ground_truth`` a
``Classification`` of its label, ``hoverlay_image`` its image id, and every user metadata
column as a field (a name FiftyOne reserves, such as ``metadata`` or ``tags``, is written as
``meta_<name>``). With a hits file of :func:`hoverlay.stores.exports.export_hits`, each hit is
a ``Detection`` in the field ``hits`` of its image's sample: the patch's box in the source
image, ``confidence`` the cosine clipped to [0, 1], and the attributes ``score`` (the cosine),
``rank``, ``query``, ``layer``, ``patch_y``, ``patch_x``.

Where a patch lies in the source: the stored S×S pixels are the source (EXIF-rotated) resized
so its shorter side is S, then centre-cropped (``pipeline.preprocess.resize_center_crop``); a
patch (y, x) of an H×W map covers the cell ``[x·S/W, (x+1)·S/W) × [y·S/H, (y+1)·S/H)`` of
those pixels (``stores.geometry``). :func:`source_box` maps that cell back, in the relative
``[top-left-x, top-left-y, width, height]`` coordinates FiftyOne's ``Detection`` takes.

fiftyone is imported only here, when this runs; it is not a dependency of hoverlay.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from hoverlay.errors import MissingDependencyError

from .errors import OutOfRangeError, UnknownLayerError
from .exports import ExportInputError, read_hits
from .reader import StoreReader, open_store

#: Sample fields FiftyOne owns (or this export writes): user columns of these names get ``meta_``.
RESERVED_FIELDS = frozenset({"id", "filepath", "tags", "metadata", "media_type", "created_at",
                             "last_modified_at", "ground_truth", "hoverlay_image", "hits"})
#: What ``preprocessing["resize"]`` says for stores whose pixels :func:`source_box` can map.
CENTRE_CROP = "centre crop"
#: EXIF orientations that swap width and height (transposed, rotated 90 or 270 degrees).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def source_box(y: int, x: int, hw: tuple[int, int], image_size: int, width: int,
               height: int) -> tuple[float, float, float, float]:
    """Relative ``(x, y, w, h)`` in the (EXIF-rotated) ``width`` × ``height`` source of patch
    (y, x) of an H×W map, for pixels made by resizing the shorter side to ``image_size`` and
    centre-cropping (the same integer sizes and offsets as ``resize_center_crop``)."""
    h, w = hw
    s = image_size
    scale = s / min(width, height)
    nw = max(s, math.ceil(width * scale - 1e-6))
    nh = max(s, math.ceil(height * scale - 1e-6))
    left, top = (nw - s) // 2, (nh - s) // 2
    x0, x1 = x * s / w, (x + 1) * s / w
    y0, y1 = y * s / h, (y + 1) * s / h
    return (left + x0) / nw, (top + y0) / nh, (x1 - x0) / nw, (y1 - y0) / nh


def local_path(source: str) -> str | None:
    """The local file of a table's ``source``, or None (a URL, or a file that is gone)."""
    path = source[len("file://"):] if source.startswith("file://") else source
    if "://" in path or not os.path.isfile(path):
        return None
    return os.path.abspath(path)


def oriented_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file as the pipeline saw it: after its EXIF rotation."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112)
    return (h, w) if orientation in SWAPPING_ORIENTATIONS else (w, h)


@dataclass
class FiftyOneExport:
    dataset: Any
    samples: int
    detections: int
    skipped_images: int   # ok originals whose source is not a local file
    skipped_hits: int     # hits on copies or on images without a sample

    def summary(self) -> str:
        text = (f"FiftyOne dataset {self.dataset.name!r}: {self.samples} samples, "
                f"{self.detections} hit detections")
        if self.skipped_images:
            text += f"; {self.skipped_images} images left out (source not a local file)"
        if self.skipped_hits:
            text += f"; {self.skipped_hits} hits left out (on rotated/scaled copies or left-out images)"
        return text


def _field(name: str) -> str:
    return f"meta_{name}" if name in RESERVED_FIELDS or name.startswith("_") else name


def _value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def export_fiftyone(store: str | os.PathLike[str] | StoreReader, name: str,
                    hits: str | os.PathLike[str] | None = None, overwrite: bool = False,
                    persistent: bool = True, storage_options: dict[str, Any] | None = None) -> FiftyOneExport:
    """Create the FiftyOne dataset ``name`` (see the module's docstring); everything — the
    hits file, its layers and coordinates, the dataset name — is checked before it is created."""
    try:
        import fiftyone as fo
    except ImportError:
        raise MissingDependencyError("the FiftyOne export needs the package fiftyone, which is not "
                                     "installed: pip install fiftyone") from None
    reader = store if isinstance(store, StoreReader) else open_store(store, storage_options=storage_options)
    resize = str(reader.attrs.preprocessing.get("resize", ""))
    if hits is not None and CENTRE_CROP not in resize:
        raise ExportInputError(f"store {reader.url!r} was not preprocessed by a centre crop "
                               f"(preprocessing {reader.attrs.preprocessing}): patch boxes in the "
                               f"source images are unknown")
    if not overwrite and fo.dataset_exists(name):
        raise ExportInputError(f"a FiftyOne dataset named {name!r} exists; choose another --name or "
                               f"pass --overwrite")
    table = reader.table()
    by_image = _hits_by_image(reader, hits) if hits is not None else {}

    originals = np.flatnonzero(table.ok & (np.asarray(table["transform"]) == "none"))
    samples, skipped_images, placed = [], 0, 0
    for image in originals.tolist():
        path = local_path(str(table["source"][image]))
        if path is None:
            skipped_images += 1
            continue
        fields: dict[str, Any] = {
            "ground_truth": fo.Classification(label=str(table["label"][image])),
            "hoverlay_image": int(image),
        }
        for column, values in table.metadata.items():
            fields[_field(column)] = _value(values[image])
        image_hits = by_image.pop(image, [])
        if image_hits:
            width, height = oriented_size(path)
            fields["hits"] = fo.Detections(detections=[_detection(fo, reader, h, width, height)
                                                       for h in image_hits])
            placed += len(image_hits)
        samples.append(fo.Sample(filepath=path, **fields))
    if not samples:
        raise ExportInputError(f"store {reader.url!r} has no ok original image whose source is a local "
                               f"file ({skipped_images} sources are URLs or gone): nothing to export")
    skipped_hits = sum(len(v) for v in by_image.values())
    dataset = fo.Dataset(name, persistent=persistent, overwrite=overwrite)
    dataset.add_samples(samples)
    return FiftyOneExport(dataset, len(samples), placed, skipped_images, skipped_hits)


def _detection(fo: Any, reader: StoreReader, hit: dict[str, Any], width: int, height: int) -> Any:
    g = reader.geometry(hit["layer"])
    box = source_box(hit["y"], hit["x"], (g.height, g.width), reader.image_size, width, height)
    return fo.Detection(label=f"query {hit['query']}", bounding_box=list(box),
                        confidence=min(1.0, max(0.0, hit["score"])), score=hit["score"], rank=hit["rank"],
                        query=hit["query"], layer=hit["layer"], patch_y=hit["y"], patch_x=hit["x"])


def _hits_by_image(reader: StoreReader, path: str | os.PathLike[str]) -> dict[int, list[dict[str, Any]]]:
    """A hits file's rows grouped by image, each checked against the store."""
    cols = read_hits(path)
    need = ("query", "rank", "layer", "image", "y", "x", "score")
    missing = [c for c in need if c not in cols]
    if missing:
        raise ExportInputError(f"hits file {os.fspath(path)!r} has no column {', '.join(missing)}; is it "
                               f"from `hoverlay export hits`?")
    out: dict[int, list[dict[str, Any]]] = {}
    for i in range(len(cols["image"])):
        try:
            layer, image, y, x = (str(cols["layer"][i]), int(cols["image"][i]), int(cols["y"][i]),
                                  int(cols["x"][i]))
            row: dict[str, Any] = {"query": int(cols["query"][i]), "rank": int(cols["rank"][i]),
                                   "layer": layer, "image": image, "y": y, "x": x,
                                   "score": float(cols["score"][i])}
        except (TypeError, ValueError) as exc:
            raise ExportInputError(f"hits file {os.fspath(path)!r} row {i + 1}: {exc}") from None
        try:
            reader.patch_id(layer, image, y, x)
        except (UnknownLayerError, OutOfRangeError) as exc:
            raise type(exc)(f"hits file {os.fspath(path)!r} row {i + 1}: {exc}") from None
        out.setdefault(image, []).append(row)
    return out
