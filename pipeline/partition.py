"""Pure planning helpers: which rows each task writes, which images are new."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def plan_partitions(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """Split rows [start, start+n) into ranges aligned to multiples of ``chunk``.

    Aligned ranges mean no two tasks ever write the same Zarr shard, so partitions can run
    in parallel without read-modify-write races; only the first range may be short.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out: list[tuple[int, int]] = []
    lo, end = start, start + n
    while lo < end:
        hi = min(end, (lo // chunk + 1) * chunk)
        out.append((lo, hi))
        lo = hi
    return out


def select_new(hashes: Sequence[str], known: Mapping[str, int] | Iterable[str]) -> tuple[list[int], int, int]:
    """Positions of images to add: not stored yet and first of their content within the run.

    Returns (positions, n_already_stored, n_duplicates_in_run).
    """
    seen = set(known)
    new: list[int] = []
    stored = dups = 0
    for pos, h in enumerate(hashes):
        if h in seen:
            if h in known:
                stored += 1
            else:
                dups += 1
            continue
        seen.add(h)
        new.append(pos)
    return new, stored, dups


def waves(items: Sequence[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """Group partitions into consecutive waves; a commit follows each wave."""
    size = max(1, size)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
