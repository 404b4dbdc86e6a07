"""Class-conditioned generated images (feature visualisation), offline, for the paper's
"natural vs generated images" case study.

Images are made by gradient ascent on one class logit of the model, from noise, the way
Lucid / Lucent make them (Olah et al., *Feature Visualization*, Distill 2017):

* a **Fourier-space parameterisation** whose spectrum is scaled by 1/frequency (natural images'
  power law), so that a gradient step changes every frequency at a similar rate;
* **decorrelated colour**: the three channels are mixed by the square root of ImageNet's colour
  covariance, then squashed into [0, 1] by a sigmoid;
* **transformation robustness**: every step sees the image padded, jittered, rescaled and
  rotated by a random amount, so the result does not rely on exact pixel positions.

Seeded and small: a ``size``-pixel image (128 by default) is optimised at that size (the
model is fully convolutional) and, for its last few steps, upsampled to the model's input size,
where it is kept and checked. On two CPU cores the default 64 steps take about 3 s per image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .models import _TRACE_LOCK, ModelAdapter, Normalization, load_model

#: Square root of ImageNet's RGB covariance (Lucid's ``color_correlation_svd_sqrt``), its
#: columns scaled so the largest has unit norm.
COLOR_CORRELATION_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]], dtype=np.float32)
#: Lucid's standard transformation robustness: pad 12 (grey), jitter 8, scale ±10 %, rotate
#: ±10°, jitter 4.
PAD, JITTER, JITTER_2 = 12, 8, 4
SCALES = tuple(1 + (i - 5) / 50 for i in range(11))
ANGLES = tuple(range(-10, 11)) + (0,) * 5


@dataclass(frozen=True)
class GeneratedImages:
    """Generated images, one per target class, and how the model classifies them."""

    pixels: np.ndarray          #: uint8 (B, S, S, 3) at the model's input size
    classes: tuple[int, ...]    #: the target class of each image
    ranks: tuple[int, ...]      #: the target's rank among the model's logits (0 = top-1)
    probabilities: tuple[float, ...]  #: the target's softmax probability
    seconds: float              #: wall time of the optimisation (all images together)

    def top5(self) -> bool:
        """Whether every image is classified as its target class within the top 5."""
        return all(r < 5 for r in self.ranks)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in index order (torchvision's, shipped with it: offline)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def class_index(name: str) -> int:
    """Index of an ImageNet class by its name (``"Egyptian cat"`` -> 285), case-insensitive."""
    names = [c.lower() for c in imagenet_categories()]
    try:
        return names.index(name.lower())
    except ValueError:
        raise ValueError(f"no ImageNet class named {name!r}") from None


def _spectrum_scale(size: int, decay: float) -> torch.Tensor:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / size) ** decay
    return torch.tensor(scale, dtype=torch.float32)[None, None, :, :, None]


def _to_model_input(x01: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Differentiable version of :meth:`Normalization.apply` for float images in [0, 1]."""
    if norm.kind == "efficientnet":
        return (x01 * 255.0 - 127.0) / 128.0
    mean = torch.tensor(norm.mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(0, n, (1,), generator=g).item())


def _robustness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random draw of the standard transformations (the same for the whole batch)."""
    x = F.pad(x, (PAD,) * 4, value=0.5)
    oy, ox = _randint(g, JITTER + 1), _randint(g, JITTER + 1)
    n = x.shape[-1] - JITTER
    x = x[..., oy:oy + n, ox:ox + n]
    s = SCALES[_randint(g, len(SCALES))]
    a = math.radians(ANGLES[_randint(g, len(ANGLES))])
    theta = torch.tensor([[math.cos(a) / s, -math.sin(a) / s, 0.0],
                          [math.sin(a) / s, math.cos(a) / s, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    oy, ox = _randint(g, JITTER_2 + 1), _randint(g, JITTER_2 + 1)
    n = x.shape[-1] - JITTER_2
    return x[..., oy:oy + n, ox:ox + n]


def generate_class_images(classes: Sequence[int | str], model: ModelAdapter | str | None = None, *,
                          steps: int = 64, refine: int = 8, size: int = 128, lr: float = 0.1,
                          seed: int = 0, decay: float = 1.0) -> GeneratedImages:
    """One image per target class (an index or an ImageNet name), by ``steps`` Adam steps of
    gradient ascent on that class's logit, all classes in one batch.

    The image is a ``size``-pixel Fourier parameterisation; the model sees it at that size
    for ``steps - refine`` steps (cheap) and upsampled to its input size for the last
    ``refine`` steps, so that the result is classified at the size it is kept (the pattern of
    a 128 px optimisation alone, seen 1.75 times larger, often reads as texture: "wool").

    ``model`` is a loaded adapter or a spec (default: the offline EfficientNet-Lite0). The
    model's own parameters are not changed (their gradients are switched off meanwhile).
    """
    targets = [class_index(c) if isinstance(c, str) else int(c) for c in classes]
    if not targets:
        raise ValueError("no classes to generate")
    if any(not 0 <= t < 1000 for t in targets):
        raise ValueError(f"ImageNet classes are 0..999, got {targets}")
    if steps < 1 or not 0 <= refine <= steps or size < 32:
        raise ValueError(f"need steps >= 1, 0 <= refine <= steps and size >= 32; got {steps}, {refine}, {size}")
    adapter = model if isinstance(model, ModelAdapter) else load_model(model or "efficientnet-lite0")
    module, device = adapter.module, adapter.device
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same draws whatever the device
    batch = len(targets)
    spectrum = (torch.randn(batch, 3, size, size // 2 + 1, 2, generator=g) * 0.01).to(device).requires_grad_(True)
    scale = _spectrum_scale(size, decay).to(device)
    mix = torch.from_numpy(COLOR_CORRELATION_SVD_SQRT / np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0).max()).to(device)

    def image() -> torch.Tensor:
        spec = torch.view_as_complex((spectrum * scale).contiguous())
        x = torch.fft.irfft2(spec, s=(size, size), norm="ortho") / 4.0
        return torch.sigmoid(torch.einsum("bchw,dc->bdhw", x, mix))

    rows = torch.arange(batch, device=device)
    target = torch.tensor(targets, device=device)
    flags = [p.requires_grad for p in module.parameters()]
    start = time.perf_counter()
    with _TRACE_LOCK:
        try:
            for p in module.parameters():
                p.requires_grad_(False)
            opt = torch.optim.Adam([spectrum], lr=lr)
            for step in range(steps):
                x = image()
                if step >= steps - refine:  # the last steps see the image at the size it is kept
                    x = F.interpolate(x, size=(adapter.image_size,) * 2, mode="bilinear", align_corners=False)
                logits = module(_to_model_input(_robustness(x, g), adapter.normalization))
                loss = -logits[rows, target].sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            for p, flag in zip(module.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = F.interpolate(image(), size=(adapter.image_size,) * 2, mode="bicubic", align_corners=False)
    pixels = (out.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    logits_np = adapter.classify(pixels).astype(np.float64)
    order = np.argsort(-logits_np, axis=1)
    ranks = tuple(int(np.flatnonzero(order[i] == t)[0]) for i, t in enumerate(targets))
    z = logits_np - logits_np.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return GeneratedImages(pixels, tuple(targets), ranks, tuple(float(prob[i, t]) for i, t in enumerate(targets)),
                           seconds)


def save_generated(images: GeneratedImages, folder: str, names: Sequence[str] | None = None) -> list[str]:
    """Write each image as a lossless PNG ``folder/<name>.png`` (default: the class name, spaces
    as underscores); returns the paths. A store built from them holds these exact pixels."""
    import os

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    categories = imagenet_categories()
    names = list(names) if names is not None else [categories[c].replace(" ", "_") for c in images.classes]
    if len(names) != len(images.classes):
        raise ValueError("one name per image")
    paths = []
    for px, name in zip(images.pixels, names, strict=True):
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(px).save(path)
        paths.append(path)
    return paths
