"""Transform sweeps, the numbers: which images are copies of which, where a patch goes, the chart.

A store built with ``build(..., rotate="0:360:30", scale="0.5:1.0:0.1")`` holds, after each
image, its rotated / rescaled copies as images of their own (table columns ``base_id``,
``transform``, ``param``). The sweep view shows a base image with its copies and charts how
similar the hovered patch stays to its counterpart as the angle or the scale changes (the
paper's "geometric transformations" section).

Plain numpy on table columns and vector arrays, no Panel: every number the view draws comes
from :func:`sweep_chart`, whose similarities are :func:`stores.transforms.sweep_similarity`
(the contract's definition), so a test can recompute them from the store independently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hoverlay.stores.table import ImageTable
from hoverlay.stores.transforms import copies_of, map_patch, sweep_similarity

#: Transform kinds charted, each with the parameter value at which the copy *is* the base image.
IDENTITY: dict[str, float] = {"rotate": 0.0, "scale": 1.0}
#: Axis titles of the charts.
AXIS_LABELS: dict[str, str] = {"rotate": "rotation (degrees)", "scale": "scale (zoom 1/s)"}


@dataclass(frozen=True)
class SweepSet:
    """A base image and its transformed copies, in display order (rotations by angle, then scales).

    ``ids`` (base first) is also the tile order of the view, so tile ``i`` of the view shows
    ``ids[i]`` and, for ``i >= 1``, copy ``i - 1``.
    """

    base: int
    copies: np.ndarray  # int64 image ids of the copies
    kinds: tuple[str, ...]
    params: tuple[float, ...]

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([[self.base], self.copies]).astype(np.int64)

    def caption(self, tile: int) -> str:
        """Short tile caption: 'base #3', '↻ 30°', '× 0.5'."""
        if tile == 0:
            return f"base #{self.base}"
        kind, p = self.kinds[tile - 1], self.params[tile - 1]
        return f"↻ {p:g}°" if kind == "rotate" else f"zoom ×{p:g}" if kind == "scale" else f"{kind} {p:g}"


def bases_with_copies(table: ImageTable) -> np.ndarray:
    """Ids of the images (status ok) that have at least one ok transformed copy, ascending."""
    ok = table.ok
    base_ids = np.asarray(table["base_id"], dtype=np.int64)
    has = np.unique(base_ids[ok & (base_ids >= 0)])
    return has[ok[has]] if has.size else has


def sweep_set(table: ImageTable, base: int) -> SweepSet:
    """The ok copies of ``base`` ordered by kind (rotate, scale, others) then parameter."""
    ids = copies_of(table["base_id"], int(base))
    ids = ids[table.ok[ids]]
    kinds = [str(k) for k in table["transform"][ids]]
    params = [float(p) for p in table["param"][ids]]
    rank = {kind: i for i, kind in enumerate(IDENTITY)}
    order = sorted(range(len(ids)), key=lambda i: (rank.get(kinds[i], len(rank)), kinds[i], params[i]))
    return SweepSet(int(base), ids[order].astype(np.int64), tuple(kinds[i] for i in order),
                    tuple(params[i] for i in order))


def copy_cells(sweep: SweepSet, y: int, x: int, hw: tuple[int, int]) -> list[tuple[int, int] | None]:
    """Where patch (y, x) of the base lands in each copy (H×W map), None when it leaves the canvas."""
    h, w = hw
    return [map_patch(y, x, h, w, kind, param) for kind, param in zip(sweep.kinds, sweep.params, strict=True)]


def sweep_chart(vectors: Mapping[str, np.ndarray], sweep: SweepSet,
                cells: Mapping[str, tuple[int, int]]) -> dict[str, dict[str, np.ndarray]]:
    """The line charts' data: ``{kind: {"param": x values, layer: cosine per x value}}``.

    ``vectors[layer]`` are the unit vectors ``(1 + n_copies, H, W, D)`` of ``sweep.ids`` (base
    first) and ``cells[layer]`` the hovered patch in that layer. Each kind's line starts (or, for
    scale, ends) at its identity value, the base image itself, so the base is part of every
    line; values come from one :func:`sweep_similarity` call per layer, NaN where the patch
    leaves the copy's canvas.
    """
    kinds = ["none", *sweep.kinds]
    out: dict[str, dict[str, np.ndarray]] = {}
    sims = {}
    for layer, vecs in vectors.items():
        y, x = cells[layer]
        sims[layer] = sweep_similarity(vecs[0], list(vecs), kinds, [0.0, *sweep.params], int(y), int(x))
    params = np.asarray([0.0, *sweep.params], dtype=np.float64)
    for kind, identity in IDENTITY.items():
        members = [i for i, k in enumerate(kinds) if k == kind]
        if not members:
            continue
        rows = np.asarray([0, *members])  # 0: the base itself, at the identity value
        x_values = np.concatenate([[identity], params[members]])
        order = np.argsort(x_values, kind="stable")
        data = {"param": x_values[order]}
        for layer, values in sims.items():
            data[layer] = values[rows[order]].astype(np.float64)
        out[kind] = data
    return out
