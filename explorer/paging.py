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
#: The filter column every store has (the folder label, or a metadata file's ``label``).
LABEL_COLUMN = "label"


def candidate_ids(ok: np.ndarray, labels: np.ndarray, label: str = ALL_LABELS) -> np.ndarray:
    """Ids of displayable images (status ok) whose column ``labels`` (the label, or any
    metadata column) matches the filter choice ``label``, in store order."""
    mask = np.asarray(ok, dtype=bool).copy()
    if label != ALL_LABELS:
        mask &= filter_mask(labels, label)
    return np.flatnonzero(mask).astype(np.int64)


#: A column with at most this many distinct values is filtered by value; a numeric one with
#: more, by :data:`NUMBER_BINS` quantile ranges; a text one with more, by its most common values.
MAX_FILTER_VALUES = 200
NUMBER_BINS = 10
#: The choice for images whose value is missing (empty text, NaN).
MISSING = "(missing)"


def filter_choices(values: np.ndarray) -> list[str]:
    """What a filter on one column offers (after :data:`ALL_LABELS`), as display strings.

    Text: its distinct values, sorted (the :data:`MAX_FILTER_VALUES` most common when there are
    more). Numbers: the distinct values when few, else quantile ranges ``"[lo, hi)"`` (the last
    one closed). :data:`MISSING` is offered where values are missing.
    """
    v = np.asarray(values)
    if v.dtype.kind == "f":
        finite = v[np.isfinite(v)]
        distinct = np.unique(finite)
        out = ([_number(x) for x in distinct] if len(distinct) <= MAX_FILTER_VALUES
               else [_range(lo, hi, last=i == NUMBER_BINS - 1)
                     for i, (lo, hi) in enumerate(_bins(finite))])
        return out + ([MISSING] if len(finite) < len(v) else [])
    text = np.array([str(x) for x in v], dtype=object)
    names, counts = np.unique(text, return_counts=True)
    if len(names) > MAX_FILTER_VALUES:
        names = names[np.argsort(-counts, kind="stable")[:MAX_FILTER_VALUES]]
    present = sorted(str(n) for n in names if n != "")
    return present + ([MISSING] if (text == "").any() else [])


def filter_mask(values: np.ndarray, choice: str) -> np.ndarray:
    """Which images a filter choice (from :func:`filter_choices`) keeps; an unknown choice keeps
    none (a URL's value is hostile: it filters to nothing rather than erroring)."""
    v = np.asarray(values)
    if choice == ALL_LABELS:
        return np.ones(len(v), dtype=bool)
    if v.dtype.kind == "f":
        if choice == MISSING:
            return ~np.isfinite(v)
        bounds = _parse_range(choice)
        if bounds is not None:
            lo, hi, closed = bounds
            return (v >= lo) & ((v <= hi) if closed else (v < hi))
        try:
            return v == float(choice)
        except ValueError:
            return np.zeros(len(v), dtype=bool)
    text = np.array([str(x) for x in v], dtype=object)
    return text == ("" if choice == MISSING else choice)


def _number(x: float) -> str:
    return f"{x:.6g}"


def _bins(finite: np.ndarray) -> list[tuple[float, float]]:
    edges = np.quantile(finite, np.linspace(0, 1, NUMBER_BINS + 1))
    return [(float(edges[i]), float(edges[i + 1])) for i in range(NUMBER_BINS)]


def _range(lo: float, hi: float, *, last: bool) -> str:
    return f"[{_number(lo)}, {_number(hi)}{']' if last else ')'}"


def _parse_range(choice: str) -> tuple[float, float, bool] | None:
    if not (choice.startswith("[") and choice.endswith(("]", ")")) and "," in choice):
        return None
    try:
        lo, hi = (float(p) for p in choice[1:-1].split(","))
    except ValueError:
        return None
    return lo, hi, choice.endswith("]")


def caption_value(value: object) -> str:
    """One metadata value as a tile caption shows it (numbers short, missing as empty)."""
    if isinstance(value, float | np.floating):
        return "" if not np.isfinite(value) else _number(float(value))
    return str(value)


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
