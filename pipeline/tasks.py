"""The work of one partition: read, decode, forward, write. Runs on any Dask worker.

Everything a task needs travels as plain arguments (strings, ints, lists), so the same
function runs under the threaded scheduler and on a remote distributed worker that opens
the store by URL. What a process needs again for every partition is kept per process: the
model (``load_model`` is cached) and the store's opened arrays (:func:`block_writer`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hoverlay.stores import STATUS_FAILED, STATUS_OK, StoreWriter
from hoverlay.stores.vectors import ZERO_NORM, normalize_patches
from hoverlay.stores.writer import BlockWriter

from .models import ModelAdapter, load_model
from .options import MAX_PIXELS
from .phases import PhaseClock
from .preprocess import ImageDecodeError, decode_image, resize_center_crop
from .sources import read_bytes
from .transforms import apply_transform


@dataclass(frozen=True)
class TaskItem:
    uri: str
    label: str
    hash: str
    error: str = ""  # set when the file could not even be read while hashing
    transform: str = "none"  # none | rotate | scale (a copy of the base image)
    param: float = 0.0
    base_id: int = -1  # row of the untransformed image, for copies


@dataclass(frozen=True)
class ModelRef:
    """How a worker finds the model: a spec it can load itself (no pickled modules)."""

    spec: str
    weights: str | None
    device: str
    #: ``torch.set_num_threads`` in the worker process (None: leave it)
    torch_threads: int | None = None
    #: forwards of this process's threads may overlap (each has its share of the cores)
    concurrent: bool = False


@dataclass(frozen=True)
class StoreRef:
    """Which store a task writes, and which state of it: ``created`` names the store (a store
    made anew at the same URL is another), ``rows`` its reserved rows (a later build's arrays
    are longer), so a worker's cached arrays are never those of another store or build."""

    url: str
    storage_options: dict[str, Any] | None
    created: str
    rows: int
    #: JPEGs are decoded at a reduced DCT scale keeping both sides >= this (None: in full)
    draft_to: int | None = None

    def key(self) -> tuple[str, str, str, int]:
        return (self.url, json.dumps(self.storage_options, sort_keys=True, default=str), self.created,
                self.rows)


@dataclass
class PartitionResult:
    """What a task sends back: its table rows and its seconds per phase (no vectors: the
    task wrote those to the store itself)."""

    rows: list[dict[str, Any]]
    phases: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


_WRITERS: dict[tuple[str, str, str, int], BlockWriter] = {}
_WRITERS_LOCK = threading.Lock()


def block_writer(store: StoreRef) -> BlockWriter:
    """The store's arrays, opened once per process and build (opening reads 1 + 2·layers
    ``zarr.json`` documents: ~10% of a 16-image partition's time on a worker)."""
    key = store.key()
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            _WRITERS.clear()  # one build at a time per process is the normal case
            writer = StoreWriter.open(store.url, storage_options=store.storage_options).block_writer()
            _WRITERS[key] = writer
        return writer


def model_for(model: ModelRef) -> ModelAdapter:
    if model.torch_threads:
        import torch

        if torch.get_num_threads() != model.torch_threads:
            torch.set_num_threads(model.torch_threads)
    return load_model(model.spec, model.weights, model.device)


def decode_item(item: TaskItem, size: int, storage_options: dict[str, Any] | None,
                max_pixels: int, draft_to: int | None = None,
                clock: PhaseClock | None = None) -> tuple[np.ndarray | None, str]:
    """The item's (S, S, 3) pixels, or None and the reason it failed."""
    if item.error:
        return None, item.error
    clock = clock or PhaseClock()
    try:
        with clock("read"):
            data = read_bytes(item.uri, storage_options)
        with clock("decode"):
            img = decode_image(data, max_pixels, draft_to)
        with clock("resize"):
            return resize_center_crop(img, size), ""
    except ImageDecodeError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read file: {exc}"
    except MemoryError:
        return None, "out of memory while decoding (image too large)"


def pad_batch(batch: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad a short batch with black images to ``batch_size``.

    Convolution kernels pick algorithms by batch shape, so a fixed shape makes every image's
    activations bit-identical however the images happened to be grouped — which is what
    makes resumed and incremental runs equal to a single uninterrupted run.
    """
    if len(batch) >= batch_size:
        return batch
    pad = np.zeros((batch_size - len(batch), *batch.shape[1:]), dtype=batch.dtype)
    return np.concatenate([batch, pad])


def unit_vectors(output: Any) -> tuple[np.ndarray, np.ndarray]:
    """A layer's output tensor -> float16 unit vectors (B, H, W, D) and float32 norms (B, H, W).

    Conv maps are normalised in torch on the channels-last copy (2x cheaper than numpy on the
    float32 array: one contiguous pass, no float32 quotient); token sequences go through
    :func:`~hoverlay.pipeline.models.to_channels_last` and numpy. Same rule either way: the
    float32 L2 norm over channels, the quotient rounded to float16, zero vectors stay zero.
    """
    import torch

    from .models import to_channels_last

    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        return normalize_patches(to_channels_last(output))
    x = output.detach().float().permute(0, 2, 3, 1).contiguous().cpu()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    zero = norms <= ZERO_NORM
    unit = torch.div(x, torch.where(zero, torch.ones_like(norms), norms)).to(torch.float16)
    if bool(zero.any()):
        unit.masked_fill_(zero, 0)
    return unit.numpy(), norms.squeeze(-1).numpy()


def process_partition(store: StoreRef, start: int, items: list[TaskItem], model: ModelRef,
                      layers: list[str], size: int, batch_size: int,
                      max_pixels: int = MAX_PIXELS,
                      on_batch: Callable[[int], None] | None = None) -> PartitionResult:
    """Write rows [start, start+len(items)) and return their table rows (status + reason).

    ``on_batch(n)`` (in-process schedulers only: a progress bar) hears of each forward batch of
    ``n`` images, and of the images that failed to decode once they are known."""
    clock = PhaseClock()
    with clock("open"):  # cached per process: ~0 unless it waits (it once waited on forwards)
        adapter = model_for(model)
        writer = block_writer(store)
    n = len(items)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    rows: list[dict[str, Any]] = []
    ok: list[int] = []
    decoded: dict[str, tuple[np.ndarray | None, str]] = {}  # copies reuse their base's decode
    for i, item in enumerate(items):
        if item.uri not in decoded:
            decoded[item.uri] = decode_item(item, size, store.storage_options, max_pixels, store.draft_to,
                                            clock)
        px, reason = decoded[item.uri]
        if px is not None and item.transform != "none":
            with clock("transform"):
                px = apply_transform(px, item.transform, item.param)
        row = {"source": item.uri, "label": item.label, "hash": item.hash,
               "base_id": item.base_id, "transform": item.transform, "param": item.param,
               "status": STATUS_OK if px is not None else STATUS_FAILED, "reason": reason}
        rows.append(row)
        if px is not None:
            pixels[i] = px
            ok.append(i)
    geometry = {name: g for name, g in writer.layers.items() if name in layers}
    vectors = {name: (np.zeros((n, g.height, g.width, g.dim), dtype=np.float16),
                      np.zeros((n, g.height, g.width), dtype=np.float32)) for name, g in geometry.items()}
    for b in range(0, len(ok), batch_size):
        idx = ok[b:b + batch_size]
        with clock("forward"):
            out = adapter.forward(pad_batch(pixels[idx], batch_size), layers, concurrent=model.concurrent)
        with clock("normalize"):
            for name in layers:
                unit, norms = unit_vectors(out[name][: len(idx)])
                vectors[name][0][idx] = unit
                vectors[name][1][idx] = norms
        del out
        if on_batch is not None:
            on_batch(len(idx))
    for i in ok:  # a row marked ok always holds vectors: all-zero ones compare to nothing
        zero = [name for name in layers if not np.any(vectors[name][1][i] > ZERO_NORM)]
        if zero:
            rows[i]["status"] = STATUS_FAILED
            rows[i]["reason"] = f"the model gave all-zero activations in layer {zero[0]!r}"
    writer.check(n, vectors)
    with clock("write_pixels"):
        writer.write_pixels(start, pixels)
    with clock("write_vectors"):
        writer.write_vectors(start, vectors)
    if on_batch is not None and n > len(ok):
        on_batch(n - len(ok))
    return PartitionResult(rows, clock.seconds)
