"""The top-k panel's content: dataset-wide nearest patches as labelled crops.

Search is delegated to :class:`stores.search.LayerSearch` (FAISS candidates re-ranked exactly,
or an exact scan); this module turns hits into small JPEG crops around each patch with the
patch outlined, and into the card data the panel (explorer.topk_view) draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from hoverlay.stores import StoreReader
from hoverlay.stores.exports import hit_columns, rows_of
from hoverlay.stores.search import LayerSearch

from . import jpeg
from .kernels import QueryVector, cell_bounds, crop_box


@dataclass(frozen=True)
class Hit:
    """One dataset-wide neighbour of the query patch."""

    image: int
    y: int
    x: int
    score: float  # exact cosine
    label: str
    #: the hit as an exported row (``stores.exports.hit_columns``: layer, source, patch id, user
    #: metadata, the full-precision score), what the panel's CSV download writes
    row: dict[str, Any] | None = field(default=None, compare=False, hash=False)


def search_hits(search: LayerSearch, query: QueryVector, k: int) -> tuple[list[Hit], str]:
    """Top-k patches of the store for a query vector with exact cosine scores; (hits, method)
    where method says how they were found (``TopK.method``)."""
    top = search.search(query.unit, int(k))
    rows = rows_of(hit_columns(search.reader, search.layer, top))
    hits = [Hit(r["image"], r["y"], r["x"], float(r["score"]), str(r["label"]), row=r) for r in rows]
    return hits, top.method


# Crops are explorer/jpeg.py's (chroma not subsampled: the outline stays crisp): a 96 px crop
# encodes in ~0.08 ms and ~3 KB where PNG at zlib level 1 took ~1.5 ms and ~17 KB (measured with
# Pillow). Eight crops a rest, every rest of every session, were the largest part of a rest's
# server CPU.
def crop_jpeg(reader: StoreReader, layer: str, hit: Hit, size: int = 96) -> bytes:
    """JPEG of the neighbourhood of a hit's patch, scaled to ``size`` px, patch outlined."""
    g = reader.geometry(layer)
    s = reader.image_size
    hw = (g.height, g.width)
    x0, y0, x1, y1 = crop_box(hit.y, hit.x, hw, s)
    img = PILImage.fromarray(np.asarray(reader.pixels(hit.image))[y0:y1, x0:x1])
    scale = size / (x1 - x0)
    img = img.resize((size, size), PILImage.Resampling.NEAREST if scale >= 2 else PILImage.Resampling.BILINEAR)
    bx0, by0, bx1, by1 = cell_bounds(hit.y, hit.x, hw, s)
    box = [(bx0 - x0) * scale, (by0 - y0) * scale, (bx1 - x0) * scale - 1, (by1 - y0) * scale - 1]
    draw = ImageDraw.Draw(img)
    draw.rectangle(box, outline=(0, 0, 0), width=3)
    draw.rectangle(box, outline=(255, 255, 255), width=1)
    return jpeg.encode(img)


def crop_uri(data: bytes) -> str:
    """A crop from :func:`crop_jpeg` as a data URI for an ``<img>``."""
    return jpeg.data_uri(data)


def card_data(hit: Hit, jpeg: bytes) -> dict[str, Any]:
    """What the browser needs to draw one result card: coordinates, score, label, crop as data URI
    (and under ``row`` the hit's exported row, which :class:`TopKCards` keeps on the server)."""
    card = {"image": hit.image, "y": hit.y, "x": hit.x, "score": round(hit.score, 6), "label": hit.label,
            "src": crop_uri(jpeg)}
    if hit.row is not None:
        card["row"] = dict(hit.row)
    return card
