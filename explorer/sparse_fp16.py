"""Page vectors as the browser receives them: float16 bits, the zeros left out where that is smaller.

The default model's layers are rectified (ReLU6): on real photos 47%, 77% and 90% of its three
layers' values are exactly zero, and a page's vectors are most of what a page sends. So a layer's
page travels as the bits of its non-zero float16 values in order plus a bitmask of which values
are non-zero (1 bit per value, little-endian bit order: value ``i`` is bit ``i % 8`` of byte
``i // 8``) whenever that is smaller than the dense bits — when more than 1/16 of the values are
zero. The browser rebuilds the exact float16 values (``GRID_HOVER_JS``'s ``decoded``), so the maps
are the same as from the dense bits. An empty mask means dense bits.

Pure functions on arrays (no Bokeh): :func:`unpack` is the reference the browser's decoder is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pack(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(bits, mask)`` for float16 ``values`` (any shape, flattened in C order): ``bits`` the
    uint16 bits of the values the mask marks (all of them, and an empty mask, when leaving the
    zeros out would not be smaller)."""
    bits = np.ascontiguousarray(values, dtype=np.float16).reshape(-1).view(np.uint16)
    nonzero = bits != 0  # +0.0 only: a -0.0 is kept, as any other value
    count = int(np.count_nonzero(nonzero))
    if 2 * count + (bits.size + 7) // 8 >= 2 * bits.size:
        return bits, np.zeros(0, np.uint8)
    return bits[nonzero], np.packbits(nonzero, bitorder="little")


def unpack(bits: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` float16 values :func:`pack` was given (flat)."""
    bits = np.asarray(bits, dtype=np.uint16)
    if not np.asarray(mask).size:
        if bits.size != size:
            raise ValueError(f"dense page vectors hold {bits.size} values, expected {size}")
        return bits.view(np.float16)
    nonzero = np.unpackbits(np.asarray(mask, dtype=np.uint8), count=size, bitorder="little").astype(bool)
    marked = int(np.count_nonzero(nonzero))
    if marked != bits.size:
        raise ValueError(f"the mask marks {marked} non-zero values, {bits.size} were sent")
    out = np.zeros(size, np.uint16)
    out[nonzero] = bits
    return out.view(np.float16)


@dataclass(frozen=True)
class PackedLayer:
    """One layer's page as the browser receives it: :func:`pack`'s ``bits`` and ``mask`` and the
    patches' float32 norms. Built where the page is read (the read-ahead's worker thread packs
    the next page there, ~20-30 ms of a 16-image page that the event loop no longer spends
    while the user waits for it)."""

    bits: np.ndarray
    mask: np.ndarray
    norms: np.ndarray

    @classmethod
    def of(cls, vectors: np.ndarray, norms: np.ndarray) -> PackedLayer:
        """Pack float16-convertible ``vectors`` (n, H, W, D) and their ``norms`` (n, H, W)."""
        bits, mask = pack(vectors)
        return cls(bits, mask, np.ascontiguousarray(norms, dtype=np.float32).reshape(-1))

    @classmethod
    def empty(cls) -> PackedLayer:
        return cls(np.zeros(0, np.uint16), np.zeros(0, np.uint8), np.zeros(0, np.float32))

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes + self.mask.nbytes + self.norms.nbytes)
