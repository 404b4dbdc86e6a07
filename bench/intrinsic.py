"""How hard is nearest-neighbour search on real activations vs the synthetic benchmark data?

Local intrinsic dimension (LID, the maximum-likelihood estimate from each point's 20 nearest
neighbours) is what makes approximate search hard: with LID ≈ D neighbours are near-random and
an IVF index must scan a large share of a cluster. This runs the embedded EfficientNet-Lite0 on
scikit-image's demo pictures (one view each, and six random crops each) and compares its layers
with :func:`hoverlay.stores.synthetic.clustered_activations` at the same width, isotropic
(``local_dim`` None) and with the ``local_dim`` the index benchmark uses.

    python -m bench.intrinsic [--local-dim 16]
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

from bench.common import report
from bench.index import LOCAL_DIM

LAYERS = ("_blocks.10.add", "_blocks.15._bn2")


def local_intrinsic_dimension(x: np.ndarray, k: int = 20, n_queries: int = 2000, seed: int = 0) -> float:
    """Median MLE local intrinsic dimension (Levina–Bickel) over up to ``n_queries`` points of ``x``
    (rows L2-normalised first, zero rows dropped)."""
    import faiss

    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    x = np.ascontiguousarray(x[norms > 0] / norms[norms > 0, None])
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    pick = np.random.default_rng(seed).choice(len(x), size=min(n_queries, len(x)), replace=False)
    d2, _ = index.search(x[pick], k + 1)
    d = np.sqrt(np.maximum(d2[:, 1:], 1e-12))  # drop the point itself
    lid = -1.0 / np.mean(np.log(d[:, :-1] / d[:, -1:]), axis=1)
    return float(np.median(lid[np.isfinite(lid)]))


def demo_views(crops: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): each skimage demo picture whole (crops=1) or as random crops."""
    import skimage
    from PIL import Image

    rng = np.random.default_rng(seed)
    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = []
    for path in sorted(glob.glob(os.path.join(data, "*.png")) + glob.glob(os.path.join(data, "*.jpg"))):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for c in range(crops):
            side = min(w, h) if crops == 1 else int(min(w, h) * rng.uniform(0.5, 1.0))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            view = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size))
            out.append(np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT) if c % 2 else view))
    return np.stack(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local-dim", type=int, default=LOCAL_DIM, help="the synthetic local_dim to compare")
    a = p.parse_args(argv)
    from hoverlay.pipeline.models import load_model
    from hoverlay.stores.synthetic import clustered_activations

    model = load_model()
    rows = []
    rng = np.random.default_rng(1)
    for crops in (1, 6):
        views = demo_views(crops)
        acts: dict[str, list[np.ndarray]] = {name: [] for name in LAYERS}
        for lo in range(0, len(views), 16):
            out = model.extract(views[lo:lo + 16], list(LAYERS))
            for name in LAYERS:
                acts[name].append(out[name].reshape(-1, out[name].shape[-1]))
        for name in LAYERS:
            real = np.concatenate(acts[name])
            n, dim = real.shape
            rows.append({"data": f"EfficientNet-Lite0 {name}", "views": f"{len(views)} ({crops}/picture)",
                         "vectors": n, "dim": dim, "LID": local_intrinsic_dimension(real)})
            for local_dim in (None, a.local_dim):
                syn = clustered_activations(rng, (n, dim), local_dim=local_dim)
                rows.append({"data": f"synthetic local_dim={local_dim}", "views": "-", "vectors": n, "dim": dim,
                             "LID": local_intrinsic_dimension(syn)})
    for dim in (112, 512):
        for local_dim in (None, a.local_dim):
            syn = clustered_activations(rng, (20000, dim), local_dim=local_dim)
            rows.append({"data": f"synthetic local_dim={local_dim}", "views": "-", "vectors": 20000, "dim": dim,
                         "LID": local_intrinsic_dimension(syn)})
    report("intrinsic", rows, {"estimator": "Levina-Bickel MLE, k=20, median over <= 2000 points, unit vectors"})


if __name__ == "__main__":
    main()
