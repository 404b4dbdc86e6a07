"""``hoverlay query``: embed any image with a store's own model and search the whole store with it.

The image goes through exactly what a build does to a stored image — the build's decode
(:func:`~hoverlay.pipeline.preprocess.decode_image`: EXIF rotation, every mode to RGB, JPEG draft
decoding where the store's preprocessing says ``jpeg_draft``), resize of the shorter side and
centre crop to the store's size, the store's model, weights and normalisation, and the build's
float16 L2 normalisation (:func:`~hoverlay.pipeline.tasks.unit_vectors`)
— so the vectors of an image that is in the store equal its stored vectors (to float16 rounding)
and its own patch comes back first with a score of ~1.

The search is the explorer's: :class:`~hoverlay.stores.search.LayerSearch` (FAISS candidates
re-ranked exactly from the stored float16 vectors, or an exact scan), the rows those of
``hoverlay export hits`` (:func:`~hoverlay.stores.exports.hit_columns`).

The query is one patch (``y``, ``x``: a cell of the layer's grid; default the centre cell) or a
box (``x0, y0, x1, y1`` in pixels of the image file as given, after EXIF rotation): the mean of
the unit vectors of every cell the box overlaps inside the centre crop the model sees,
re-normalised — each patch weighs the same, as it does in a cosine.

Nothing is ever written to the store. The model worker of the explorer
(:mod:`hoverlay.pipeline.query_worker`) uses :func:`load_store_model` and :func:`embed_image`.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hoverlay.errors import UsageError
from hoverlay.stores import StoreReader, open_store
from hoverlay.stores.errors import StoreMismatchError
from hoverlay.stores.exports import (
    HIT_COLUMNS,
    check_table_output,
    hit_columns,
    rows_of,
    write_table,
)
from hoverlay.stores.query_wire import EmbeddedImage, EmbeddedLayer
from hoverlay.stores.search import LayerSearch, TopK
from hoverlay.stores.uploads import DEFAULT_MAX_BYTES, UploadError, read_upload, validate_upload

from .models import ModelAdapter, load_model
from .options import MAX_PIXELS
from .preprocess import ImageDecodeError, decode_image, draft_size, resize_center_crop
from .tasks import unit_vectors

#: Columns of an exported query, before :data:`~hoverlay.stores.exports.HIT_COLUMNS` and the
#: store's metadata columns: the query image's file, its patch (-1, -1 for a box), the box
#: ("x0,y0,x1,y1", "" for a patch) and the hit's rank (from 1).
QUERY_COLUMNS = ("query", "query_source", "query_y", "query_x", "query_box", "rank")


@dataclass
class StoreModel:
    """A store's own model, loaded here, with what embedding for that store needs."""

    url: str
    adapter: ModelAdapter
    size: int
    layers: list[str]
    geometry: dict[str, Any]          # layer -> stores.LayerGeometry
    model: dict[str, Any]             # the store's model record
    load_seconds: float = 0.0
    #: JPEG draft decoding of the store's builds (``preprocess.draft_size``; None: full decode)
    draft_to: int | None = None


def load_store_model(store: str | os.PathLike[str] | StoreReader, *,
                     storage_options: dict[str, Any] | None = None, device: str = "cpu") -> StoreModel:
    """Load the model a store was built with (its spec and weights, as its attributes record).

    Weights that cannot be loaded here raise :class:`~hoverlay.pipeline.errors.WeightsError`
    (e.g. a state-dict file that is not on this machine, pretrained weights not downloaded); a
    model whose normalisation differs from the store's (another hoverlay version) a
    :class:`~hoverlay.stores.errors.StoreMismatchError`: its vectors would not compare.
    """
    t = time.perf_counter()
    reader = store if isinstance(store, StoreReader) else open_store(store, storage_options=storage_options)
    attrs = reader.attrs
    spec = str(attrs.model.get("spec"))
    weights = attrs.model.get("weights")
    adapter = load_model(spec, None if weights is None else str(weights), device)
    stored = attrs.preprocessing.get("normalization")
    if stored is not None and stored != adapter.normalization.to_json():
        raise StoreMismatchError(f"store {reader.url!r} normalises inputs as {stored}, but model "
                                 f"{spec!r} here as {adapter.normalization.to_json()}: its vectors "
                                 f"would not compare; query with the hoverlay that built the store")
    adapter.check_layers(reader.layers)
    size = int(attrs.image_size)
    return StoreModel(reader.url, adapter, size, list(reader.layers), dict(attrs.layers),
                      dict(attrs.model), time.perf_counter() - t, draft_size(size, attrs.preprocessing))


def embed_pixels(model: StoreModel, pixels: np.ndarray,
                 layers: Sequence[str] | None = None) -> dict[str, EmbeddedLayer]:
    """uint8 (S, S, 3) model input -> each layer's float16 unit vectors and float32 norms,
    exactly as a build stores them (:func:`~hoverlay.pipeline.tasks.unit_vectors`)."""
    names = list(layers) if layers is not None else list(model.layers)
    unknown = [n for n in names if n not in model.geometry]
    if unknown:
        from hoverlay.stores import UnknownLayerError

        raise UnknownLayerError(f"unknown layer {unknown[0]!r}; store {model.url!r} has {model.layers}")
    # every stored layer, whichever are asked for: one extractor per store (torch.fx traces once
    # per layer set, ~0.1 s), and the forward to the deepest layer computes the others anyway
    out = model.adapter.forward(np.asarray(pixels, dtype=np.uint8)[None], model.layers)
    embedded = {}
    for name in names:
        unit, norms = unit_vectors(out[name])
        g = model.geometry[name]
        if unit.shape[1:] != (g.height, g.width, g.dim):
            raise StoreMismatchError(f"layer {name!r} of model {model.adapter.spec!r} gives {unit.shape[1:]} "
                                     f"here, but the store holds {(g.height, g.width, g.dim)}")
        embedded[name] = EmbeddedLayer(unit[0], norms[0])
    return embedded


@dataclass(frozen=True)
class Decoded:
    """An image decoded as a build decodes it: the model input and the sizes a box maps through."""

    pixels: np.ndarray          # uint8 (S, S, 3)
    width: int                  # the image file's size after EXIF rotation (box coordinates)
    height: int
    decoded_width: int          # the decoded size (smaller where a JPEG was draft-decoded)
    decoded_height: int


def _problem(reason: str) -> str:
    """The :class:`~hoverlay.stores.uploads.UploadError` case of a build's decode failure."""
    low = reason.lower()
    for words, problem in ((("empty",), "empty"), (("bomb", "too large"), "bomb"),
                           (("not an image", "unrecognised"), "not-an-image")):
        if any(w in low for w in words):
            return problem
    return "truncated"


def oriented_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image file after its EXIF orientation, from the header only."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_for_store(data: bytes, model: StoreModel, *, name: str = "the image",
                     max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = MAX_PIXELS,
                     validated: bool = False) -> Decoded:
    """Validate (:func:`hoverlay.stores.uploads.validate_upload`, unless the caller just did),
    then decode, resize and crop with the build's own code and the store's draft setting."""
    if not validated:
        validate_upload(data, name=name, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        img = decode_image(data, max_pixels, model.draft_to)
        w, h = oriented_size(data)
    except ImageDecodeError as exc:
        label = " ".join(str(name).split())[:80]
        raise UploadError(_problem(str(exc)), f"{label!r}: {exc}") from None
    return Decoded(resize_center_crop(img, model.size), w, h, int(img.size[0]), int(img.size[1]))


def embed_image(data: bytes, model: StoreModel, layers: Sequence[str] | None = None, *,
                name: str = "the image", max_bytes: int = DEFAULT_MAX_BYTES,
                max_pixels: int = MAX_PIXELS, validated: bool = False) -> EmbeddedImage:
    """An image file's bytes -> its vectors in each layer (default: all of the store's), with
    the model input pixels and timings; a bad file is an :class:`~hoverlay.stores.uploads.UploadError`."""
    t0 = time.perf_counter()
    decoded = decode_for_store(data, model, name=name, max_bytes=max_bytes, max_pixels=max_pixels,
                               validated=validated)
    t1 = time.perf_counter()
    layers_out = embed_pixels(model, decoded.pixels, layers)
    t2 = time.perf_counter()
    return EmbeddedImage(decoded.pixels, layers_out, dict(model.model),
                         {"decode": t1 - t0, "forward": t2 - t1})


# ================================================================================ the query
@dataclass
class QueryResult:
    """The top-k patches of a store for a patch (or box) of an image that need not be in it."""

    store: str
    source: str                      # the query image as given
    layer: str
    grid: tuple[int, int]            # (H, W) of the layer
    y: int | None                    # the query cell (None for a box)
    x: int | None
    box: tuple[int, int, int, int] | None   # x0, y0, x1, y1 in the image's pixels (None: a patch)
    cells: list[tuple[int, int]]     # the (y, x) cells whose vectors made the query
    vector: np.ndarray               # float32 (D,): the unit query vector searched with
    top: TopK
    hits: dict[str, np.ndarray]      # hit_columns: layer, image, source, label, y, x, patch_id, score, metadata
    method: str                      # how the hits were found (TopK.method)
    warning: str | None              # the search's (no index, stale index), if any
    embedded: EmbeddedImage
    timings: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return rows_of(self.table_columns())

    def table_columns(self) -> dict[str, np.ndarray]:
        """:data:`QUERY_COLUMNS`, then the hit columns: what ``--out`` writes."""
        n = len(self.top.ids)
        box = ",".join(map(str, self.box)) if self.box else ""
        query = {"query": np.zeros(n, np.int64), "query_source": np.full(n, self.source, dtype=object),
                 "query_y": np.full(n, -1 if self.y is None else self.y, np.int64),
                 "query_x": np.full(n, -1 if self.x is None else self.x, np.int64),
                 "query_box": np.full(n, box, dtype=object), "rank": np.arange(1, n + 1, dtype=np.int64)}
        return query | self.hits

    def describe(self) -> str:
        where = (f"box {','.join(map(str, self.box))} ({len(self.cells)} cells)" if self.box
                 else f"patch (y={self.y}, x={self.x})")
        return (f"query {self.source} at {where} of layer {self.layer} (grid {self.grid[0]}x{self.grid[1]}) "
                f"in {self.store}: top {len(self.top.ids)} by {self.method}")

    def lines(self) -> list[str]:
        """The printed table: a header line, then rank, score, image, y, x, label, source."""
        out = [self.describe()]
        if self.warning:
            out.append(f"note: {self.warning}")
        out.append(f"{'rank':>4}  {'score':>8}  {'image':>6}  {'y':>3}  {'x':>3}  {'label':<12}  source")
        h = self.hits
        for i in range(len(self.top.ids)):
            out.append(f"{i + 1:>4}  {float(h['score'][i]):>8.5f}  {int(h['image'][i]):>6}  {int(h['y'][i]):>3}  "
                       f"{int(h['x'][i]):>3}  {str(h['label'][i]):<12}  {h['source'][i]}")
        return out

    def write(self, out: str | os.PathLike[str]) -> str:
        """Write :meth:`table_columns` to ``.parquet`` or ``.csv`` (atomically); returns the path."""
        path, fmt = check_table_output(out)
        write_table(self.table_columns(), path, fmt)
        return path


def parse_box(text: str) -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` -> four integers with x0 < x1 and y0 < y1, or a :class:`UsageError`."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        x0, y0, x1, y1 = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--box {text!r} is not x0,y0,x1,y1 (four integers, pixels)") from None
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise UsageError(f"--box {text!r}: want 0 <= x0 < x1 and 0 <= y0 < y1")
    return x0, y0, x1, y1


def box_cells(box: tuple[int, int, int, int], image_wh: tuple[int, int], size: int,
              grid: tuple[int, int], decoded_wh: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Cells (y, x) of a layer's grid that a box in the image file's pixels (``image_wh``, after
    EXIF rotation) overlaps, once the image is decoded (``decoded_wh``: smaller for a JPEG
    draft decode), resized (shorter side to ``size``) and centre-cropped as a build does it
    (:func:`~hoverlay.pipeline.preprocess.resize_center_crop`'s arithmetic)."""
    fw, fh = image_wh
    bx0, by0, bx1, by1 = box
    if bx1 > fw or by1 > fh:
        raise UsageError(f"--box {','.join(map(str, box))} reaches beyond the image ({fw}x{fh} pixels)")
    w, h = decoded_wh or image_wh
    x0, x1, y0, y1 = bx0 * w / fw, bx1 * w / fw, by0 * h / fh, by1 * h / fh
    scale = size / min(w, h)
    nw, nh = max(size, math.ceil(w * scale - 1e-6)), max(size, math.ceil(h * scale - 1e-6))
    left, top = (nw - size) // 2, (nh - size) // 2
    # the box in model-input pixels, clipped to the crop
    ax0, ax1 = max(0.0, x0 * nw / w - left), min(float(size), x1 * nw / w - left)
    ay0, ay1 = max(0.0, y0 * nh / h - top), min(float(size), y1 * nh / h - top)
    if ax1 <= ax0 or ay1 <= ay0:
        sx0, sx1 = left * fw / nw, (left + size) * fw / nw
        sy0, sy1 = top * fh / nh, (top + size) * fh / nh
        raise UsageError(f"--box {','.join(map(str, box))} lies outside the centre crop the model sees "
                         f"(x {sx0:.0f}..{sx1:.0f}, y {sy0:.0f}..{sy1:.0f} of the {fw}x{fh} image)")
    gh, gw = grid

    def span(lo: float, hi: float, n: int) -> range:
        first = min(n - 1, int(math.floor(lo * n / size)))
        last = max(first, min(n - 1, int(math.ceil(hi * n / size)) - 1))
        return range(first, last + 1)

    return [(cy, cx) for cy in span(ay0, ay1, gh) for cx in span(ax0, ax1, gw)]


def query_image(image: str | os.PathLike[str] | bytes, store: str | os.PathLike[str] | StoreReader, *,
                layer: str | None = None, y: int | None = None, x: int | None = None,
                box: str | tuple[int, int, int, int] | None = None, k: int = 32,
                storage_options: dict[str, Any] | None = None, device: str = "cpu",
                max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = MAX_PIXELS,
                model: StoreModel | None = None, name: str | None = None) -> QueryResult:
    """Top-``k`` patches of ``store`` for a patch of ``image`` (a path, or the file's bytes).

    ``layer``: default the store's last (deepest) layer. The query is the cell ``(y, x)`` of that
    layer's grid (both or neither; default the centre cell ``(H // 2, W // 2)``) or the mean of a
    ``box`` (``"x0,y0,x1,y1"`` in the image file's pixels), not both. ``model`` reuses a
    :func:`load_store_model` result (many queries, one load). Everything that can be checked
    before the forward pass is (layer, coordinates, ``k``, the file itself).
    """
    t0 = time.perf_counter()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k: {k!r} is not a positive integer")
    if (y is None) != (x is None):
        raise UsageError("give both --y and --x (a cell of the layer's grid), or neither (the centre)")
    if box is not None and y is not None:
        raise UsageError("give either --y/--x (a patch) or --box (the mean of a region), not both")
    reader = store if isinstance(store, StoreReader) else open_store(store, storage_options=storage_options)
    chosen = layer or reader.layers[-1]
    g = reader.geometry(chosen)  # an unknown layer names the store's layers
    if y is not None and x is not None and not (0 <= y < g.height and 0 <= x < g.width):
        raise UsageError(f"patch (y={y}, x={x}) is outside the {g.height}x{g.width} grid of layer {chosen!r} "
                         f"(y in 0..{g.height - 1}, x in 0..{g.width - 1})")
    the_box: tuple[int, int, int, int] | None = None
    if isinstance(box, str):
        the_box = parse_box(box)
    elif box is not None:
        the_box = parse_box(",".join(str(int(v)) for v in box))
    if isinstance(image, (bytes, bytearray)):
        data, source = bytes(image), name or "the image"
        validate_upload(data, name=source, max_bytes=max_bytes, max_pixels=max_pixels)
    else:
        source = name or os.fspath(image)
        data, _ = read_upload(image, name=source, max_bytes=max_bytes, max_pixels=max_pixels)
    t1 = time.perf_counter()
    sm = model if model is not None and model.url == reader.url else load_store_model(reader, device=device)
    t2 = time.perf_counter()
    decoded = decode_for_store(data, sm, name=source, max_pixels=max_pixels, validated=True)
    t3 = time.perf_counter()
    layers = embed_pixels(sm, decoded.pixels, [chosen])
    t4 = time.perf_counter()
    embedded = EmbeddedImage(decoded.pixels, layers, dict(sm.model), {"decode": t3 - t2, "forward": t4 - t3})
    unit = layers[chosen].vectors
    if the_box is not None:
        cells = box_cells(the_box, (decoded.width, decoded.height), sm.size, (g.height, g.width),
                          (decoded.decoded_width, decoded.decoded_height))
        mean = np.mean([unit[cy, cx].astype(np.float32) for cy, cx in cells], axis=0)
        norm = float(np.linalg.norm(mean))
        if norm <= 1e-12:
            raise UsageError(f"--box {','.join(map(str, the_box))}: its patches are zero vectors in layer "
                             f"{chosen!r} (nothing to compare); choose another region or layer")
        vector = (mean / norm).astype(np.float32)
        qy = qx = None
    else:
        qy, qx = (y, x) if y is not None and x is not None else (g.height // 2, g.width // 2)
        cells = [(qy, qx)]
        # the stored form (float16 unit vector), as the explorer queries with a stored patch
        vector = unit[qy, qx].astype(np.float32)
        if not np.any(vector):
            raise UsageError(f"patch (y={qy}, x={qx}) of layer {chosen!r} is a zero vector here (its "
                             f"activations are all 0): nothing compares to it; choose another patch")
    search = LayerSearch(reader, chosen, query_threads=None)
    top = search.search(vector, k)
    hits = hit_columns(reader, chosen, top)
    t5 = time.perf_counter()
    assert set(HIT_COLUMNS) <= set(hits)
    return QueryResult(reader.url, source, chosen, (g.height, g.width), qy, qx, the_box, cells, vector, top,
                       hits, top.method, search.warning, embedded,
                       {"read": t1 - t0, "load_model": t2 - t1, "decode": t3 - t2, "forward": t4 - t3,
                        "search": t5 - t4, "total": t5 - t0})
