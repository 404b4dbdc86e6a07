"""``hoverlay check``: read every committed chunk and every index of a store, and say what is wrong.

Opening a store already validates its root document and ``committed`` against the arrays; a
read already refuses a chunk that is missing or does not decode (:class:`CorruptStoreError`).
This module does those reads for *every* committed row, a shard at a time, so that damage is
found before a user or a build meets it, and checks each layer's index against the table:
present, readable, covering every committed image, the right number of vectors, and its re-rank
file as long as it says. It never writes; repairs (rebuilding indexes, which hold nothing that
is not in the arrays) are the caller's (:func:`hoverlay.pipeline.indexing.update_index`).
Damaged data — pixels, vectors, norms, table or metadata — cannot be rebuilt from the store
itself: the report says which images and files, to restore or rebuild.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CorruptStoreError, StoreError
from .format import PIXELS, TABLE, layer_path
from .index import PatchIndex, read_index_meta
from .index_meta import IndexMeta
from .reader import StoreReader
from .rerank import rerank_path


@dataclass
class Finding:
    """One thing wrong with a store."""

    where: str          # "images/pixels", "layers/<l>/vectors", "index <layer>", …
    problem: str        # what is wrong, naming image ids and files
    repairable: bool    # an index or re-rank file: rebuilt from the arrays by --repair
    layer: str | None = None


@dataclass
class CheckReport:
    store: str
    images: int
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was read, for the summary
    #: layers without an index: no damage (``build --no-index`` makes such stores; top-k then
    #: scans exactly), but ``--repair`` builds one
    unindexed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def damaged_data(self) -> list[Finding]:
        return [f for f in self.findings if not f.repairable]

    def lines(self) -> list[str]:
        head = (f"{self.store}: {self.images} committed images; checked {', '.join(self.checked)}")
        notes = [f"no index for {', '.join(self.unindexed)} (top-k scans exactly; --repair builds one)"] \
            if self.unindexed else []
        if self.ok:
            return [head, *notes, "no problems found"]
        out = [head, *notes, f"{len(self.findings)} problem(s):"]
        for f in self.findings:
            fix = "repairable with --repair" if f.repairable else "data: restore the file or rebuild the store"
            out.append(f"  {f.where}: {f.problem} ({fix})")
        return out


def check_store(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                images_per_read: int | None = None,
                on_progress: Callable[[int], None] | None = None) -> CheckReport:
    """Read every committed chunk (``images_per_read`` images at a time, default one shard)
    and check every index; returns the findings (an unopenable store raises instead)."""
    reader = StoreReader(url, storage_options=storage_options)
    n = reader.n_images
    report = CheckReport(reader.url, n)
    report.checked.append("table")
    try:
        reader.table()
    except (CorruptStoreError, StoreError, ValueError) as exc:
        report.findings.append(Finding(TABLE, _text(exc), repairable=False))
        return report  # without the table no row can be judged ok or failed
    step = int(images_per_read or reader.attrs.chunk)
    arrays: list[tuple[str, Callable[[slice], np.ndarray]]] = [(PIXELS, reader.pixels)]
    for layer in reader.layers:
        arrays.append((layer_path(layer, "vectors"), functools.partial(reader.vectors, layer)))
        arrays.append((layer_path(layer, "norms"), functools.partial(reader.norms, layer)))
    report.checked += ["pixels", "vectors and norms of " + ", ".join(reader.layers)]
    for where, read in arrays:
        bad: list[str] = []
        for lo in range(0, n, step):
            try:
                read(slice(lo, min(n, lo + step)))
            except (CorruptStoreError, ValueError, RuntimeError) as exc:
                bad.append(_text(exc))
            if on_progress is not None:
                on_progress(min(step, n - lo))
        if bad:
            more = f" (and {len(bad) - 1} more shard(s))" if len(bad) > 1 else ""
            report.findings.append(Finding(where, bad[0] + more, repairable=False,
                                           layer=_layer_of(where, reader.layers)))
    for layer in reader.layers:
        try:
            meta = read_index_meta(reader.url, layer, reader.storage_options)
        except (StoreError, ValueError) as exc:
            report.findings.append(Finding(f"index {layer}", _text(exc), repairable=True, layer=layer))
            continue
        if meta is None:
            report.unindexed.append(layer)
        else:
            report.findings += _check_index(reader, layer, meta)
    report.checked.append("indexes")
    return report


def _check_index(reader: StoreReader, layer: str, meta: IndexMeta) -> list[Finding]:
    where = f"index {layer}"
    out = []
    try:
        index = PatchIndex.load(reader.url, layer, mmap=True, storage_options=reader.storage_options)
    except Exception as exc:  # FAISS says "not readable" in many ways (RuntimeError, StoreError)
        return [Finding(where, f"the .faiss file does not load: {_text(exc)}", repairable=True, layer=layer)]
    if meta.images_indexed != reader.n_images:
        out.append(Finding(where, f"stale: covers {meta.images_indexed} of {reader.n_images} committed "
                                  f"images", repairable=True, layer=layer))
    else:
        ok = int(reader.table().ok[: meta.images_indexed].sum())
        expected = ok * reader.geometry(layer).patches_per_image
        if int(index.index.ntotal) != expected:
            out.append(Finding(where, f"holds {index.index.ntotal} vectors, the table's {ok} ok images "
                                      f"have {expected} patches", repairable=True, layer=layer))
    path = rerank_path(reader.url, layer)
    rows = meta.rerank_rows
    if rows and path is not None:
        want = rows * reader.geometry(layer).dim * 2
        have = os.path.getsize(path) if os.path.exists(path) else None
        if have != want:
            shown = "missing" if have is None else f"{have} bytes"
            out.append(Finding(f"re-rank file {layer}", f"{path} is {shown}, {rows} rows need {want} bytes",
                               repairable=True, layer=layer))
    return out


def _layer_of(where: str, layers: list[str]) -> str | None:
    return next((la for la in layers if where in (layer_path(la, "vectors"), layer_path(la, "norms"))), None)


def _text(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

