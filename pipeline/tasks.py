"""The work of one partition: read, decode, forward, write. Runs on any Dask worker.

Everything a task needs travels as plain arguments (strings, ints, lists), so the same
function runs under the threaded scheduler and on a remote distributed worker that opens
the store by URL. The model is loaded once per process (``load_model`` is cached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hoverlay.stores import STATUS_FAILED, STATUS_OK, StoreWriter

from .models import load_model
from .options import MAX_PIXELS
from .preprocess import ImageDecodeError, load_pixels
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
    torch_threads: int | None = None


def decode_item(item: TaskItem, size: int, storage_options: dict[str, Any] | None,
                max_pixels: int) -> tuple[np.ndarray | None, str]:
    if item.error:
        return None, item.error
    try:
        return load_pixels(read_bytes(item.uri, storage_options), size, max_pixels), ""
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


def process_partition(store_url: str, start: int, items: list[TaskItem], model: ModelRef,
                      layers: list[str], size: int, batch_size: int,
                      storage_options: dict[str, Any] | None = None,
                      max_pixels: int = MAX_PIXELS,
                      on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Write rows [start, start+len(items)) and return their table rows (status + reason).

    ``on_batch(n)`` (in-process schedulers only: a progress bar) hears of each forward batch of
    ``n`` images, and of the images that failed to decode once they are known."""
    if model.torch_threads:
        import torch

        torch.set_num_threads(model.torch_threads)
    adapter = load_model(model.spec, model.weights, model.device)
    writer = StoreWriter.open(store_url, storage_options=storage_options)
    geometry = writer.layers
    n = len(items)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    rows: list[dict[str, Any]] = []
    ok: list[int] = []
    decoded: dict[str, tuple[np.ndarray | None, str]] = {}  # copies reuse their base's decode
    for i, item in enumerate(items):
        if item.uri not in decoded:
            decoded[item.uri] = decode_item(item, size, storage_options, max_pixels)
        px, reason = decoded[item.uri]
        if px is not None and item.transform != "none":
            px = apply_transform(px, item.transform, item.param)
        row = {"source": item.uri, "label": item.label, "hash": item.hash,
               "base_id": item.base_id, "transform": item.transform, "param": item.param,
               "status": STATUS_OK if px is not None else STATUS_FAILED, "reason": reason}
        rows.append(row)
        if px is not None:
            pixels[i] = px
            ok.append(i)
    acts = {name: np.zeros((n, g.height, g.width, g.dim), dtype=np.float32)
            for name, g in geometry.items() if name in layers}
    for b in range(0, len(ok), batch_size):
        idx = ok[b:b + batch_size]
        out = adapter.extract(pad_batch(pixels[idx], batch_size), layers)
        for name in layers:
            acts[name][idx] = out[name][: len(idx)]
        if on_batch is not None:
            on_batch(len(idx))
    for i in ok:  # a row marked ok always holds vectors: all-zero activations compare to nothing
        zero = [name for name in layers if not np.any(acts[name][i])]
        if zero:
            rows[i]["status"] = STATUS_FAILED
            rows[i]["reason"] = f"the model gave all-zero activations in layer {zero[0]!r}"
    writer.write_block(start, pixels, acts)
    if on_batch is not None and n > len(ok):
        on_batch(n - len(ok))
    return rows
