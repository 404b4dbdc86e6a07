"""Which images are on which page: filtering, ordering and slicing image ids.

Pure numpy on the store's table columns, so the grid's navigation can be tested without a
browser and stays cheap for millions of images (one boolean mask, one slice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Page orderings offered by the explorer.
ORDERS: tuple[str, ...] = ("index", "random", "similar")
ALL_LABELS = "(all)"


def candidate_ids(ok: np.ndarray, labels: np.ndarray, label: str = ALL_LABELS) -> np.ndarray:
    """Ids of displayable images (status ok) with the given label, in store order."""
    mask = np.asarray(ok, dtype=bool).copy()
    if label != ALL_LABELS:
        mask &= np.asarray(labels) == label
    return np.flatnonzero(mask).astype(np.int64)


def ordered_ids(candidates: np.ndarray, order: str = "index", seed: int = 0,
                ranked: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Candidates in display order.

    ``random`` is a seeded permutation (a "random sample" is its first page; a new seed draws
    another); ``similar`` puts the candidates that appear in ``ranked`` (image ids ranked by
    their best patch's similarity to the query) first, in that order, and every other candidate
    after them in store order: a search that found patches of only some images must not hide the
    rest (the app says how many were ranked).
    """
    cand = np.asarray(candidates, dtype=np.int64)
    if order == "index":
        return cand
    if order == "random":
        return np.random.default_rng(seed).permutation(cand)
    if order == "similar":
        ranked_a = np.asarray(ranked if ranked is not None else [], dtype=np.int64)
        return np.concatenate([ranked_a[np.isin(ranked_a, cand)], cand[~np.isin(cand, ranked_a)]])
    raise ValueError(f"unknown order {order!r}; choose from {ORDERS}")


def n_pages(n_ids: int, page_size: int) -> int:
    return max(1, math.ceil(n_ids / max(1, page_size)))


def page_of(ids: np.ndarray, page: int, page_size: int) -> np.ndarray:
    """The ids on page ``page`` (0-based), clipped to the last page."""
    page = min(max(0, int(page)), n_pages(len(ids), page_size) - 1)
    return np.asarray(ids[page * page_size:(page + 1) * page_size], dtype=np.int64)


def page_containing(ids: np.ndarray, image: int, page_size: int) -> int | None:
    """The page on which ``image`` appears in ``ids``, or None."""
    hit = np.flatnonzero(np.asarray(ids) == image)
    return int(hit[0]) // max(1, page_size) if hit.size else None
