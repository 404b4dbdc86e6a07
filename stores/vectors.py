"""Pure numeric kernels for patch vectors (no Zarr, no torch).

Vectors are stored L2-normalised in float16 so that cosine similarity is an inner product
(one matmul for a page, FAISS ``METRIC_INNER_PRODUCT`` for the dataset); the original norms
are kept in float32 so dot-product similarity and norm weighting stay possible.
"""

from __future__ import annotations

import numpy as np

#: Norms below this are treated as zero vectors (their unit vector is all zeros).
ZERO_NORM = 1e-12


def normalize_patches(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split activations (..., D) into float16 unit vectors and float32 norms.

    The norm is computed in float32 on the float32 input; zero vectors stay zero (cosine 0 to
    everything) instead of producing NaNs.
    """
    acts = np.asarray(activations, dtype=np.float32)
    norms = np.linalg.norm(acts, axis=-1)
    safe = np.where(norms > ZERO_NORM, norms, 1.0)
    unit = (acts / safe[..., None]).astype(np.float16)
    unit[norms <= ZERO_NORM] = 0
    return unit, norms.astype(np.float32)


def cosine_to_patches(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Inner products of one unit query (D,) with unit vectors (..., D) in float32."""
    q = np.asarray(query, dtype=np.float32)
    v = np.asarray(vectors)
    flat = v.reshape(-1, v.shape[-1]).astype(np.float32, copy=False)
    return (flat @ q).reshape(v.shape[:-1])
