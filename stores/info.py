"""A human-readable description of a store (``hoverlay info``)."""

from __future__ import annotations

from typing import Any

from .index import index_path, read_index_meta
from .reader import StoreReader
from .urls import filesystem


def store_size_bytes(url: str, storage_options: dict[str, Any] | None = None) -> int:
    fs, path = filesystem(url, storage_options)
    try:
        return int(fs.du(path))
    except FileNotFoundError:
        return 0


def index_file_bytes(reader: StoreReader, layer: str) -> int:
    """Size of ``index/<layer>.faiss`` (0 when missing): the memory a server maps for it."""
    fs, path = filesystem(index_path(reader.url, layer) + ".faiss", reader.storage_options)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return 0


def describe(reader: StoreReader) -> str:
    a = reader.attrs
    table = reader.table()
    ok = int(table.ok.sum())
    lines = [
        f"store      {reader.url}",
        f"format     hoverlay v{a.format_version} (written by hoverlay {a.tool_version})",
        f"model      {a.model.get('spec')} (weights: {a.model.get('weights')})",
        f"input      {a.image_size}x{a.image_size} px, {a.preprocessing.get('normalization')}",
        f"images     {reader.n_images} committed ({ok} ok, {reader.n_images - ok} failed), "
        f"updated {a.updated}",
        f"size       {store_size_bytes(reader.url, reader.storage_options) / 1e6:.1f} MB on disk",
        "layers",
    ]
    for name, g in a.layers.items():
        meta = read_index_meta(reader.url, name, reader.storage_options)
        if meta is None:
            idx = "no index"
        else:
            stale = "" if meta.images_indexed == reader.n_images else \
                f", STALE: covers {meta.images_indexed} images"
            rec = meta.recall
            took = f" p50 {rec.p50_ms:.1f} ms" if rec is not None and rec.p50_ms == rec.p50_ms else ""
            via = f" re-rank file {meta.rerank_rows * g.dim * 2 / 1e6:.1f} MB" if meta.rerank_rows else ""
            recall = f"recall@{rec.k}={rec.value:.3f}" if rec is not None else "recall not measured"
            idx = (f"index {meta.factory} ntotal={meta.ntotal} "
                   f"file {index_file_bytes(reader, name) / 1e6:.1f} MB {recall}{took}{via}{stale}")
        lines.append(f"  {name:<24} H={g.height:<3} W={g.width:<3} D={g.dim:<5} {idx}")
    labels, counts = _label_counts(table["label"][table.ok])
    if labels:
        lines.append("labels     " + ", ".join(f"{lab} ({c})" for lab, c in zip(labels, counts, strict=True)))
    return "\n".join(lines)


def _label_counts(labels: Any) -> tuple[list[str], list[int]]:
    from collections import Counter

    c = Counter(str(x) for x in labels)
    items = sorted(c.items())
    return [k for k, _ in items], [v for _, v in items]
