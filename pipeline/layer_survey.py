"""Which outputs of a model are feature maps, which are non-negative, and which are the defaults.

One probe forward over every node (a few seeded noise images) gives each output's shape and
sign. From those facts alone, with no list kept per model, this module decides:

* **feature maps**: conv outputs ``(B, D, H, W)`` and token sequences ``(B, T, D)`` whose ``T``
  is a square grid plus up to :data:`MAX_PREFIX_TOKENS` class/register tokens in front (ViT,
  DeiT, DINO, CLIP encoders). Not feature maps: the raw input (or a copy of it), zero padding
  (a map with a border row or column that is exactly zero in every channel of every probe
  image: what a ``ZeroPad2d`` makes, and what no real activation does on noise), parameters (no batch
  dimension), attention tensors (a "map" that is not square, or finer than half the input) and
  everything else;
* **non-negative** layers: every value ≥ 0 on the probe (post-ReLU/ReLU6/sigmoid nodes, and
  pools or concatenations of them). Cosine similarity of such vectors lies in [0, 1] and NMF
  factorises them without clipping anything, which is why the paper used post-ReLU layers;
* **defaults**, three layers:

  - a multi-resolution model (a CNN): at each of the three coarsest resolutions, the last
    non-negative feature map (the last feature map there when none is non-negative);
  - a single-resolution model (a token model): the outputs of the blocks of its block stack
    (the longest run of same-class children of one container: ``encoder.layers`` of a
    torchvision ViT, ``blocks`` of a timm one) at a third, two thirds and the end of its depth;
  - a small model with neither: one layer per resolution, or maps at three depths of its one.

Everything here is plain Python on arrays and names: no torch, testable on made-up outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Class/distillation/register tokens a token layer may carry in front of its grid.
MAX_PREFIX_TOKENS = 16
#: Images in the probe batch (an odd number, so no parameter tensor passes for a batch).
PROBE_IMAGES = 3
#: How many default layers a model gets.
DEFAULT_COUNT = 3

MAP, TOKENS, INPUT, PADDING, OTHER = "map", "tokens", "input", "padding", "other"


@dataclass(frozen=True)
class LayerInfo:
    """One output of a model, as seen on the probe."""

    name: str
    #: the output's shape without the batch, as the model returns it; None if not a tensor
    shape: tuple[int, ...] | None
    kind: str  # map | tokens | input | padding | other
    #: (H, W, D) as the store keeps it; None unless a feature map
    grid: tuple[int, int, int] | None = None
    #: class/register tokens dropped in front of a token grid
    prefix_tokens: int = 0
    non_negative: bool = False

    @property
    def feature_map(self) -> bool:
        return self.kind in (MAP, TOKENS)

    @property
    def side(self) -> int:
        return self.grid[0] if self.grid else 0

    def describe(self) -> str:
        """``D=112 H=14 W=14`` (+ tokens dropped, + ``>=0``) for listings."""
        if self.grid is None:
            return "x".join(map(str, self.shape)) if self.shape else "(not a tensor)"
        h, w, d = self.grid
        text = f"D={d} H={h} W={w}"
        if self.kind == TOKENS:
            text += f" tokens ({self.prefix_tokens} dropped)" if self.prefix_tokens else " tokens"
        return text + ("  >=0" if self.non_negative else "")


def token_grid(tokens: int) -> tuple[int, int] | None:
    """(grid side, prefix tokens) of a token count, or None when it is no square grid plus a
    few prefix tokens (the grid is the largest square that fits: 197 -> 14×14 + 1)."""
    side = math.isqrt(tokens)
    prefix = tokens - side * side
    if side < 2 or prefix > MAX_PREFIX_TOKENS:
        return None
    return side, prefix


def classify_output(name: str, value: np.ndarray | None, *, batch: int, input_side: int) -> LayerInfo:
    """What one probe output is (see the module docstring); ``value`` is batch-first."""
    if value is None:
        return LayerInfo(name, None, OTHER)
    shape = tuple(int(s) for s in value.shape[1:]) if value.ndim else ()
    if value.ndim == 0 or value.shape[0] != batch:
        return LayerInfo(name, tuple(int(s) for s in value.shape), OTHER)
    if value.ndim == 4:
        d, h, w = shape
        if (d, h, w) == (3, input_side, input_side):
            return LayerInfo(name, shape, INPUT)
        if h != w or h * 2 > input_side:  # inputs are square; finer than half is attention
            return LayerInfo(name, shape, OTHER)
        if h >= 3 and w >= 3 and _zero_ring(value):
            return LayerInfo(name, shape, PADDING)
        return LayerInfo(name, shape, MAP, (h, w, d), 0, bool(np.min(value) >= 0))
    if value.ndim == 3:
        found = token_grid(shape[0])
        if found is None:
            return LayerInfo(name, shape, OTHER)
        side, prefix = found
        grid_tokens = value[:, prefix:]
        return LayerInfo(name, shape, TOKENS, (side, side, shape[1]), prefix,
                         bool(np.min(grid_tokens) >= 0))
    return LayerInfo(name, shape, OTHER)


def _zero_ring(value: np.ndarray) -> bool:
    """A border row or column that is exactly zero in every channel of every image (padding
    may be one-sided: TensorFlow's "same" padding for stride 2 adds only right and bottom)."""
    edges = (value[:, :, 0, :], value[:, :, -1, :], value[:, :, :, 0], value[:, :, :, -1])
    return bool(any(not e.any() for e in edges) and value[:, :, 1:-1, 1:-1].any())


def tokens_to_grid(t: np.ndarray, prefix_tokens: int | None = None) -> np.ndarray:
    """(B, T, D) tokens -> (B, side, side, D), prefix tokens dropped (inferred when not given)."""
    b, n, d = t.shape
    found = token_grid(n)
    if found is None:
        raise ValueError(f"cannot read {n} tokens as a square grid plus at most "
                         f"{MAX_PREFIX_TOKENS} class/register tokens")
    side, prefix = found
    if prefix_tokens is not None and prefix_tokens != prefix:
        raise ValueError(f"{n} tokens do not hold {prefix_tokens} prefix tokens and a square grid")
    return t[:, prefix:].reshape(b, side, side, d)


def block_stack(children: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> list[str]:
    """The longest run of same-class children of one container: the model's block stack.

    ``children`` is ``[(container name, [(child name, class name), ...]), ...]``; the result is
    the run's full module names in order (``encoder.layers.encoder_layer_0``, …), or ``[]``.
    """
    best: list[str] = []
    for container, kids in children:
        run: list[str] = []
        last = None
        for child, cls in kids:
            if cls != last:
                run, last = [], cls
            run.append(f"{container}.{child}" if container else child)
            if len(run) > len(best):
                best = list(run)
    return best if len(best) >= DEFAULT_COUNT else []


def depth_picks(items: Sequence[str], count: int = DEFAULT_COUNT) -> list[str]:
    """Items at a third, two thirds and the end (for count 3) of a sequence, without repeats."""
    n = len(items)
    if not n:
        return []
    picks = [items[max(0, round(n * k / count) - 1)] for k in range(1, count + 1)]
    return list(dict.fromkeys(picks))


def choose_defaults(infos: Sequence[LayerInfo], blocks: Sequence[LayerInfo] = (),
                    count: int = DEFAULT_COUNT) -> list[LayerInfo]:
    """The default layers, finest first (see the module docstring).

    ``infos`` are every output in execution order; ``blocks`` the block stack's outputs (only
    used when the model has fewer than ``count`` resolutions).
    """
    maps = [i for i in infos if i.feature_map and i.side >= 2]
    sides = sorted({i.side for i in maps})

    def last_at(side: int) -> LayerInfo:
        at = [i for i in maps if i.side == side]
        return ([i for i in at if i.non_negative] or at)[-1]

    if len(sides) >= count:
        return [last_at(side) for side in sides[:count]][::-1]
    stack = [b for b in blocks if b.feature_map]
    if len(stack) >= count:
        by_name = {b.name: b for b in stack}
        return [by_name[n] for n in depth_picks([b.name for b in stack], count)]
    if len(sides) > 1:  # a small model: one layer per resolution it has
        return [last_at(side) for side in sides][::-1]
    by_name = {i.name: i for i in maps}
    return [by_name[n] for n in depth_picks([i.name for i in maps], count)]


def nearest_non_negative(infos: Sequence[LayerInfo], layer: str) -> LayerInfo | None:
    """The non-negative feature map at ``layer``'s resolution closest to it in execution order
    (ties go to the later one), or at any resolution when none is at that one."""
    names = [i.name for i in infos]
    if layer not in names:
        return None
    here = names.index(layer)
    side = infos[here].side
    candidates = [(k, i) for k, i in enumerate(infos) if i.feature_map and i.non_negative and k != here]
    same = [(k, i) for k, i in candidates if i.side == side] or candidates
    if not same:
        return None
    return min(same, key=lambda ki: (abs(ki[0] - here), -ki[0]))[1]


def module_output_names(nodes: Sequence[str], modules: set[str]) -> dict[str, str]:
    """Node name -> the shortest module name whose output it is (its last node), for display:
    ``layer4.1.relu_1`` -> ``layer4``, ``inception5b.cat`` -> ``inception5b``."""
    last_under: dict[str, str] = {}
    for node in nodes:
        parts = node.split(".")
        for i in range(1, len(parts)):
            last_under[".".join(parts[:i])] = node
    out: dict[str, str] = {}
    for prefix, node in last_under.items():
        if prefix in modules and (node not in out or len(prefix) < len(out[node])):
            out[node] = prefix
    return out
