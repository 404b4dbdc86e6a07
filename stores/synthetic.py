"""Synthetic stores written through the public writer: for tests and benchmarks.

Vectors have cluster structure (a mixture of directions plus noise, rectified like ReLU
activations) so that indexes and similarity maps behave as on real activations, not as on
uniform noise where every approximate index looks bad.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .geometry import LayerGeometry
from .writer import StoreWriter, create_store

DEFAULT_LAYERS: dict[str, LayerGeometry] = {
    "fine": LayerGeometry(8, 8, 16),
    "coarse": LayerGeometry(4, 4, 32),
}


def clustered_activations(rng: np.random.Generator, shape: tuple[int, ...], n_clusters: int = 32,
                          centers: np.ndarray | None = None, noise: float = 0.35,
                          local_dim: int | None = None) -> np.ndarray:
    """float32 non-negative activations (..., D) drawn around ``n_clusters`` random centres.

    ``local_dim`` None: isotropic noise in all D dimensions, so near neighbours within a cluster
    are close to random (local intrinsic dimension ≈ 40 at D=112, ≈ 90 at D=512) — a worst
    case for approximate search. ``local_dim`` r: the same noise energy lies in an r-dimensional
    subspace per cluster (plus 5% isotropic), like real activations: EfficientNet-Lite0's
    112- and 320-channel layers measure a local intrinsic dimension of ~10 and ~6
    (``bench.intrinsic``), whatever their width.
    """
    dim = shape[-1]
    if centers is None:
        centers = np.abs(np.random.default_rng(12345 + dim).standard_normal((n_clusters, dim)))
    n = int(np.prod(shape[:-1]))
    which = rng.integers(0, len(centers), size=n)
    if local_dim is None:
        spread = noise * rng.standard_normal((n, dim))
    else:
        bases = cluster_bases(len(centers), dim, local_dim)  # (clusters, r, D), orthonormal rows
        coords = rng.standard_normal((n, local_dim)) * (noise * np.sqrt(dim / local_dim))
        spread = 0.05 * noise * rng.standard_normal((n, dim))
        for c in np.unique(which):  # one (m, r) @ (r, D) product per cluster
            rows = which == c
            spread[rows] += coords[rows] @ bases[c]
    acts = centers[which] + spread
    acts *= rng.uniform(0.5, 2.0, size=(n, 1))  # varying norms, like real activations
    return np.maximum(acts, 0).astype(np.float32).reshape(shape)


def cluster_bases(n_clusters: int, dim: int, local_dim: int) -> np.ndarray:
    """One fixed random orthonormal r-dimensional basis per cluster: (clusters, r, D)."""
    if not 1 <= local_dim <= dim:
        raise ValueError(f"local_dim must be in 1..{dim}, got {local_dim}")
    g = np.random.default_rng(54321 + dim * 1000 + local_dim).standard_normal((n_clusters, dim, local_dim))
    q, _ = np.linalg.qr(g)  # (clusters, D, r) with orthonormal columns
    return np.ascontiguousarray(np.swapaxes(q, 1, 2))


def synthetic_pixels(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth colourful uint8 images (gradients + blobs) so overlays are visibly aligned."""
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        freq = rng.uniform(1, 4, size=3)
        img = np.stack([0.5 + 0.5 * np.sin(freq[c] * (xx + yy * (c + 1)) * np.pi + phase[c])
                        for c in range(3)], axis=-1)
        out[i] = (img * 255).astype(np.uint8)
    return out


def make_synthetic_store(url: str | os.PathLike[str], n_images: int, *,
                         layers: Mapping[str, LayerGeometry] | None = None, image_size: int = 64,
                         chunk: int = 16, seed: int = 0, labels: tuple[str, ...] = ("a", "b", "c"),
                         block: int = 256, overwrite: bool = True, local_dim: int | None = None,
                         metadata: Mapping[str, Sequence[Any]] | None = None) -> StoreWriter:
    """Create and commit a store of ``n_images`` synthetic images, written ``block`` at a time
    (``local_dim``: see :func:`clustered_activations`). ``metadata`` gives metadata columns, one
    value per image: floats make a number column, anything else a text column."""
    layers = dict(layers or DEFAULT_LAYERS)
    metadata = dict(metadata or {})
    kinds = {c: "float64" if all(isinstance(v, float) for v in vals) else "str" for c, vals in metadata.items()}
    writer = create_store(url, model={"spec": "synthetic", "seed": seed},
                          preprocessing={"kind": "synthetic"}, image_size=image_size,
                          layers=layers, chunk=chunk, overwrite=overwrite, metadata=kinds)
    start = _append(writer, n_images, np.random.default_rng(seed), labels, f"syn-{seed}-", block, local_dim,
                    commit=not metadata)
    if metadata:
        writer.write_metadata(start, {c: [v if kinds[c] == "float64" else str(v) for v in vals]
                                      for c, vals in metadata.items()})
        writer.commit(start + n_images)
    return writer


def append_synthetic_images(url: str | os.PathLike[str], n_images: int, *, seed: int = 1,
                            label: str = "new", hash_prefix: str = "new-", block: int = 256) -> int:
    """Append and commit ``n_images`` synthetic images, as a scheduled pipeline run would;
    returns the first new image id."""
    return _append(StoreWriter.open(url), n_images, np.random.default_rng(seed), (label,), hash_prefix, block)


def _append(writer: StoreWriter, n_images: int, rng: np.random.Generator, labels: tuple[str, ...],
            hash_prefix: str, block: int, local_dim: int | None = None, commit: bool = True) -> int:
    start = writer.reserve(n_images)
    block = max(writer.attrs.chunk, block - block % writer.attrs.chunk)
    size = writer.attrs.image_size
    for lo in range(0, n_images, block):
        hi = min(n_images, lo + block)
        acts = {name: clustered_activations(rng, (hi - lo, g.height, g.width, g.dim), local_dim=local_dim)
                for name, g in writer.layers.items()}
        writer.write_block(start + lo, synthetic_pixels(rng, hi - lo, size), acts)
        writer.write_table(start + lo, [
            {"source": f"synthetic://{start + i}", "label": labels[i % len(labels)], "hash": f"{hash_prefix}{i}"}
            for i in range(lo, hi)])
    if commit:
        writer.commit(start + n_images)
    return start
