"""The wire between the explorer and its model worker process: framed messages and their payload.

Why a module of ``stores``: the client (``hoverlay.explorer.query_worker``) and the worker
(``hoverlay.pipeline.query_worker``) live on the two sides of the dependency rule
pipeline -> stores <- explorer, and this is the contract between them, as the store format is.
Standard library and numpy only: the explorer imports it without torch.

A message is one frame on a byte stream (the worker's stdin for requests, a private copy of its
stdout for answers)::

    b"HVQ1"  uint32 header bytes  uint32 blob count  uint64 length of each blob
    header (UTF-8 JSON object)    blob 0  blob 1  …

All integers big-endian. The header says what the message is (``op``, ``id``, …); blobs carry
bytes as they are: the image file in a request, each layer's float16 vectors and float32 norms
and the uint8 pixels in an answer, described by the header (dtype, shape) so that no pickle is
ever read — a worker that misbehaves can send garbage, never code.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

MAGIC = b"HVQ1"
_HEAD = struct.Struct(">4sII")
_LEN = struct.Struct(">Q")
#: Refuse frames beyond these sizes (a corrupted length would otherwise allocate gigabytes).
MAX_HEADER_BYTES = 1 << 20
MAX_BLOBS = 1024
MAX_FRAME_BYTES = 2 << 30


class WireError(ValueError):
    """A frame that is not one: wrong magic, absurd sizes, a header that is not a JSON object."""


def write_message(stream: IO[bytes], header: Mapping[str, Any],
                  blobs: Sequence[bytes | bytearray | memoryview] = ()) -> None:
    """Write one frame and flush (the caller serialises writers)."""
    text = json.dumps(dict(header), allow_nan=False, separators=(",", ":")).encode()
    views = [memoryview(b).cast("B") for b in blobs]
    parts: list[bytes | memoryview] = [_HEAD.pack(MAGIC, len(text), len(views))]
    parts += [_LEN.pack(v.nbytes) for v in views]
    parts.append(text)
    parts += views
    for part in parts:
        stream.write(part)
    stream.flush()


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    chunks = []
    left = n
    while left:
        chunk = stream.read(left)
        if not chunk:
            if left == n:
                return None  # a clean end between frames
            raise WireError(f"the stream ended inside a frame ({n - left} of {n} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(stream: IO[bytes]) -> tuple[dict[str, Any], list[bytes]] | None:
    """The next frame's (header, blobs); None when the stream ended cleanly before a frame."""
    head = _read_exactly(stream, _HEAD.size)
    if head is None:
        return None
    magic, n_header, n_blobs = _HEAD.unpack(head)
    if magic != MAGIC:
        raise WireError(f"not a query-worker frame (magic {magic!r})")
    if n_header > MAX_HEADER_BYTES or n_blobs > MAX_BLOBS:
        raise WireError(f"frame header of {n_header} bytes with {n_blobs} blobs is beyond the limits")
    lengths = []
    for _ in range(n_blobs):
        raw = _read_exactly(stream, _LEN.size)
        if raw is None:
            raise WireError("the stream ended inside a frame")
        lengths.append(_LEN.unpack(raw)[0])
    if sum(lengths) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {sum(lengths)} bytes is beyond the {MAX_FRAME_BYTES}-byte limit")
    text = _read_exactly(stream, n_header) if n_header else b""
    try:
        header = json.loads(text or b"{}")
    except ValueError as exc:
        raise WireError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a JSON object")
    blobs = []
    for n in lengths:
        blob = _read_exactly(stream, n) if n else b""
        if blob is None:
            raise WireError("the stream ended inside a frame")
        blobs.append(blob)
    return header, blobs


# ========================================================================= the payload
@dataclass(frozen=True)
class EmbeddedLayer:
    """One layer of an embedded image, exactly as a build would store it."""

    vectors: np.ndarray   # float16 (H, W, D), L2-normalised (zero vectors stay zero)
    norms: np.ndarray     # float32 (H, W), the activations' norms before normalising


@dataclass(frozen=True)
class EmbeddedImage:
    """An image embedded with a store's model: what a query needs, with nothing written anywhere."""

    pixels: np.ndarray                    # uint8 (S, S, 3): the model input (resized, centre-cropped)
    layers: dict[str, EmbeddedLayer]
    model: dict[str, Any] = field(default_factory=dict)   # the store's model record
    #: seconds spent in the worker: decode (+resize), forward, normalise; and load when the
    #: store's model was loaded for this request
    timings: dict[str, float] = field(default_factory=dict)


def _array_blob(array: np.ndarray) -> tuple[dict[str, Any], memoryview]:
    a = np.ascontiguousarray(array)
    return {"dtype": a.dtype.str, "shape": list(a.shape)}, a.reshape(-1).view(np.uint8).data


def _blob_array(spec: Mapping[str, Any], blob: bytes) -> np.ndarray:
    dtype = np.dtype(str(spec["dtype"]))
    if dtype.kind not in "fiu":
        raise WireError(f"unexpected dtype {dtype} in an answer")
    shape = tuple(int(s) for s in spec["shape"])
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(blob):
        raise WireError(f"blob of {len(blob)} bytes is not an array {dtype} {shape}")
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def encode_embedding(image: EmbeddedImage) -> tuple[dict[str, Any], list[memoryview]]:
    """(header fields, blobs) of an answer: pixels first, then vectors and norms of each layer."""
    spec, blob = _array_blob(image.pixels)
    blobs = [blob]
    layers = []
    for name, layer in image.layers.items():
        v, vb = _array_blob(layer.vectors)
        n, nb = _array_blob(layer.norms)
        layers.append({"name": name, "vectors": v, "norms": n})
        blobs += [vb, nb]
    return {"pixels": spec, "layers": layers, "model": image.model, "timings": image.timings}, blobs


def decode_embedding(header: Mapping[str, Any], blobs: Sequence[bytes]) -> EmbeddedImage:
    """The inverse of :func:`encode_embedding` (arrays are read-only views of the blobs)."""
    layers_spec = header.get("layers")
    if not isinstance(layers_spec, list) or len(blobs) != 1 + 2 * len(layers_spec):
        raise WireError("an answer whose blobs do not match its layers")
    pixels = _blob_array(header["pixels"], blobs[0])
    layers = {}
    for i, spec in enumerate(layers_spec):
        layers[str(spec["name"])] = EmbeddedLayer(_blob_array(spec["vectors"], blobs[1 + 2 * i]),
                                                  _blob_array(spec["norms"], blobs[2 + 2 * i]))
    return EmbeddedImage(pixels, layers, dict(header.get("model") or {}),
                         {str(k): float(v) for k, v in (header.get("timings") or {}).items()})
