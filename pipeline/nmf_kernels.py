"""Pure numeric kernels for NMF groups of patch activations (numpy + scikit-learn, no Zarr).

``pipeline.factorize`` feeds these functions blocks of patch rows read from a store; keeping
them free of I/O lets the tests check the numerics on plain matrices and keeps the out-of-core
loop (what is read when) in one place.

Conventions: a *block* is a float32 matrix (rows, D) of patch activations, one row per patch.
Weights are expressed against **unit-norm components**, so ``block ≈ weights @ components``
with weights in the same units as the stored activation norms.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import NMF, MiniBatchNMF
from sklearn.exceptions import ConvergenceWarning

from .errors import PipelineError

#: What to do with negative activations (block outputs without a ReLU have them):
#: ``clip`` factorises ReLU(a); ``shift`` adds a per-channel constant so that the smallest
#: value seen is 0; ``error`` refuses.
NEGATIVE_POLICIES = ("clip", "shift", "error")

#: sklearn's default: over one epoch the statistics of earlier blocks decay by this factor.
FORGET_FACTOR = 0.7

#: float16 cannot hold more; weights beyond it would become inf in the store.
FLOAT16_MAX = float(np.finfo(np.float16).max)


class NegativeActivationsError(PipelineError, ValueError):
    """The input has negative values and the policy is ``error``."""


class NothingToFactorizeError(PipelineError, ValueError):
    """Every selected value is zero after the negative policy: NMF has nothing to explain."""


def activations(unit: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Stored float16 unit vectors (..., D) × float32 norms (...) -> float32 rows (n, D).

    The store keeps direction and magnitude apart; NMF needs the original activation, because
    a weak patch should get small weights rather than the same weight as a strong one.
    """
    unit = np.asarray(unit)
    dim = unit.shape[-1]
    out = unit.reshape(-1, dim).astype(np.float32)
    out *= np.asarray(norms, dtype=np.float32).reshape(-1, 1)
    return out


@dataclass
class InputStats:
    """Running statistics of raw activations, gathered block by block in one pass.

    ``negative_mass_fraction`` is how much of the L1 mass a ``clip`` policy throws away; the
    per-channel minimum is what a ``shift`` policy needs.
    """

    rows: int = 0
    total_mass: float = 0.0
    negative_mass: float = 0.0
    channel_min: np.ndarray | None = field(default=None, repr=False)

    def update(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        self.rows += block.shape[0]
        self.total_mass += float(np.abs(block, dtype=np.float64).sum())
        self.negative_mass += float(-np.minimum(block, 0, dtype=np.float64).sum())
        low = block.min(axis=0)
        self.channel_min = low if self.channel_min is None else np.minimum(self.channel_min, low)

    @property
    def negative_mass_fraction(self) -> float:
        return self.negative_mass / self.total_mass if self.total_mass > 0 else 0.0


def channel_shift(channel_min: np.ndarray) -> np.ndarray:
    """Per-channel offsets that make the smallest value of every channel 0 (never negative)."""
    return np.maximum(-np.asarray(channel_min, dtype=np.float32), 0).astype(np.float32)


def make_nonnegative(block: np.ndarray, policy: str, *, shift: np.ndarray | None = None,
                     layer: str = "?") -> np.ndarray:
    """Apply the negative policy to a float32 block, in place where possible.

    ``clip`` is the default because a block output without ReLU is, for the next layers, a
    mixture of positive evidence and inhibition; NMF of ReLU(a) describes the positive part
    (what the layer *detects*) and the caller reports how much mass was dropped.
    """
    if policy == "clip":
        return np.maximum(block, 0, out=block)
    if policy == "shift":
        if shift is None:
            raise ValueError("negative policy 'shift' needs the per-channel shift (a stats pass)")
        block += shift
        return np.maximum(block, 0, out=block)  # values below the measured minimum: none, or fp noise
    if policy == "error":
        if block.size and float(block.min()) < 0:
            raise NegativeActivationsError(
                f"layer {layer!r} has negative activations (minimum {float(block.min()):.4g}); "
                f"NMF needs non-negative input: use negative='clip' (--negative clip: NMF of "
                f"ReLU(a)) or negative='shift' (--negative shift)")
        return block
    raise ValueError(f"unknown negative policy {policy!r}; choose one of {NEGATIVE_POLICIES}")


def new_model(k: int, *, seed: int, rows_per_block: int, total_rows: int,
              forget_factor: float = FORGET_FACTOR) -> MiniBatchNMF:
    """A MiniBatchNMF whose every ``partial_fit`` call is one step with sklearn's fit() decay.

    ``partial_fit`` computes its decay from the first block only (``forget_factor ** 1`` when
    batch_size >= rows), which would forget 30% per block; passing the per-block decay
    ``forget_factor ** (rows_per_block / total_rows)`` reproduces what ``fit`` does on a finite
    data set: over one epoch, old statistics decay by ``forget_factor``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    frac = min(1.0, max(1, rows_per_block) / max(1, total_rows))
    return MiniBatchNMF(n_components=k, init="custom", batch_size=2**31 - 1,
                        forget_factor=forget_factor ** frac, random_state=seed)


def warm_start(block: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) of a full coordinate-descent NMF of one block: the start of the minibatch fit.

    Multiplicative minibatch updates from an SVD start converge slowly (tens of epochs to get
    a low-rank matrix within 5%); starting from an exact NMF of the first block needs only
    one block in memory and leaves the epochs to refine, not to find, the components.
    """
    init = "nndsvda" if k <= min(block.shape) else "random"
    nmf = NMF(n_components=k, init=init, solver="cd", max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = nmf.fit_transform(block)
    return w.astype(block.dtype), nmf.components_.astype(block.dtype)


@dataclass
class FitResult:
    model: MiniBatchNMF
    epochs: int            # epochs actually run
    steps: int             # partial_fit calls
    change: float          # relative change of the components over the last epoch


def fit_blocks(epoch_blocks: Callable[[int], Iterable[np.ndarray]], k: int, *, total_rows: int,
               rows_per_block: int, epochs: int = 3, tol: float = 1e-3, seed: int = 0) -> FitResult:
    """Fit NMF by ``partial_fit`` over ``epoch_blocks(e)`` for e = 0, 1, ... (non-negative blocks).

    Only one block is in memory at a time. Stops after ``epochs`` passes, or earlier when the
    (unit-normalised) components moved less than ``tol`` over a whole epoch. All-zero blocks
    are skipped: they carry no information and make the multiplicative updates divide 0 by 0.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model = new_model(k, seed=seed, rows_per_block=rows_per_block, total_rows=total_rows)
    steps, change, previous, epoch = 0, float("inf"), None, 0
    for epoch in range(epochs):
        for block in epoch_blocks(epoch):
            if block.size == 0 or not np.any(block > 0):
                continue
            if steps == 0:
                w, h = warm_start(block, k, seed)
                model.partial_fit(block, W=w, H=h)
            else:
                model.partial_fit(block)
            steps += 1
        if steps == 0:
            raise NothingToFactorizeError("no positive values to factorise: every selected patch "
                                          "is zero after the negative policy")
        current = unit_components(model)[0]
        if previous is not None:
            change = float(np.linalg.norm(current - previous) / max(float(np.linalg.norm(previous)), 1e-30))
            if change < tol:
                break
        previous = current
    return FitResult(model=model, epochs=epoch + 1, steps=steps, change=change)


def unit_components(model: MiniBatchNMF) -> tuple[np.ndarray, np.ndarray]:
    """Components scaled to unit L2 norm (k, D) float32, and the scales (k,) that were divided out.

    Unit components are comparable with the store's unit patch vectors (cosine = dot), and the
    weights absorb the scale so the product is unchanged.
    """
    h = np.asarray(model.components_, dtype=np.float32)
    scale = np.linalg.norm(h, axis=1)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return h / scale[:, None], scale


def transform_block(model: MiniBatchNMF, block: np.ndarray) -> np.ndarray:
    """Weights (rows, k) float32 of a block against the unit components; zero rows get zeros."""
    if block.shape[0] == 0:
        return np.zeros((0, model.n_components_), dtype=np.float32)
    w = np.zeros((block.shape[0], model.n_components_), dtype=np.float32)
    nonzero = np.any(block > 0, axis=1)
    if np.any(nonzero):
        w[nonzero] = model.transform(block[nonzero])
    return w * unit_components(model)[1][None, :]


def assign_groups(weights: np.ndarray) -> np.ndarray:
    """int16 group per row: argmax of its weights, -1 where every weight is 0 (nothing to explain)."""
    groups = np.argmax(weights, axis=-1).astype(np.int16)
    groups[~np.any(weights > 0, axis=-1)] = -1
    return groups


def squared_errors(block: np.ndarray, weights: np.ndarray,
                   components: np.ndarray) -> tuple[float, float]:
    """(‖block − weights·components‖², ‖block‖²) in float64, to sum over blocks.

    Summing the two parts lets the caller report the relative Frobenius error of the whole
    data set without holding it.
    """
    residual = block - weights @ components
    return float(np.square(residual, dtype=np.float64).sum()), float(np.square(block, dtype=np.float64).sum())


def to_float16(weights: np.ndarray) -> np.ndarray:
    """Weights as stored: float16, clipped to its finite range so no weight becomes inf."""
    return np.minimum(weights, FLOAT16_MAX).astype(np.float16)
