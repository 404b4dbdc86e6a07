"""A description of a store: ``hoverlay info`` (text) and ``hoverlay info --json`` (one document).

:func:`store_facts` gathers the facts once; :func:`describe` only formats them, so the text and
the JSON cannot say different things.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from .format import PIXELS, layer_path
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


def _number(x: float | None) -> float | None:
    """JSON has no NaN: a measurement that was not taken is null."""
    return None if x is None or math.isnan(x) else float(x)


def _index_facts(reader: StoreReader, layer: str) -> dict[str, Any] | None:
    meta = read_index_meta(reader.url, layer, reader.storage_options)
    if meta is None:
        return None
    rec = meta.recall
    return {
        "factory": meta.factory,
        "ntotal": meta.ntotal,
        "images_indexed": meta.images_indexed,
        "stale": meta.images_indexed != reader.n_images,
        "file_bytes": index_file_bytes(reader, layer),
        "recall": None if rec is None else {"k": rec.k, "value": _number(rec.value), "queries": rec.queries,
                                            "p50_ms": _number(rec.p50_ms)},
        "rerank_file_bytes": meta.rerank_rows * reader.geometry(layer).dim * 2,
        "params": dict(meta.params),
    }


def store_facts(reader: StoreReader) -> dict[str, Any]:
    """Everything ``hoverlay info`` says about a store, as JSON-ready values (no NaN: null).

    Keys: ``store``, ``format`` (``name``, ``version``, ``tool_version``), ``model``,
    ``preprocessing``, ``image_size``, ``chunk``, ``images`` (``committed``, ``ok``, ``failed``),
    ``created``, ``updated``, ``size_bytes``, ``layers`` (name -> ``height``, ``width``, ``dim``,
    ``index``: null or ``factory``, ``ntotal``, ``images_indexed``, ``stale``, ``file_bytes``,
    ``recall`` (null or ``k``, ``value``, ``queries``, ``p50_ms``), ``rerank_file_bytes``,
    ``params``), ``labels`` (label -> ok images, sorted by label) and ``metadata`` (column ->
    ``kind`` ``"str"``/``"float64"`` and ``missing``: committed images without a value).
    """
    a = reader.attrs
    table = reader.table()
    ok = int(table.ok.sum())
    labels = Counter(str(x) for x in table["label"][table.ok])
    return {
        "store": reader.url,
        "format": {"name": "hoverlay", "version": a.format_version, "tool_version": a.tool_version},
        "model": a.model,
        "preprocessing": a.preprocessing,
        "image_size": a.image_size,
        "chunk": a.chunk,
        "images": {"committed": reader.n_images, "ok": ok, "failed": reader.n_images - ok},
        "created": a.created,
        "updated": a.updated,
        "size_bytes": store_size_bytes(reader.url, reader.storage_options),
        "layers": {name: {"height": g.height, "width": g.width, "dim": g.dim,
                          "index": _index_facts(reader, name)} for name, g in a.layers.items()},
        "labels": dict(sorted(labels.items())),
        "metadata": {col: {"kind": kind, "missing": _missing(table.metadata[col])}
                     for col, kind in a.metadata.items()},
        "missing_shards": missing_shards(reader),
    }


def missing_shards(reader: StoreReader) -> dict[str, list[int]]:
    """Array -> shard numbers that hold an ok image but have no file: the cheap part of
    ``hoverlay check`` (one listing per array, no chunk read), so ``info`` can warn.

    A shard of failed images only may be absent (Zarr does not write chunks of fill values).
    """
    n, chunk = reader.n_images, reader.attrs.chunk
    if n == 0:
        return {}
    ok = reader.table().ok
    wanted = [i for i in range((n + chunk - 1) // chunk) if ok[i * chunk:(i + 1) * chunk].any()]
    paths = [PIXELS] + [layer_path(la, kind) for la in reader.layers for kind in ("vectors", "norms")]
    out: dict[str, list[int]] = {}
    for path in paths:
        base = f"{reader.url.rstrip('/')}/{path}/c"
        fs, root = filesystem(base, reader.storage_options)
        try:
            present = {p[len(root.rstrip("/")) + 1:].split("/", 1)[0] for p in fs.find(root)}
        except (FileNotFoundError, OSError):
            present = set()
        gone = [i for i in wanted if str(i) not in present]
        if gone:
            out[path] = gone
    return out


def _missing(values: Any) -> int:
    v = np.asarray(values)
    return int((~np.isfinite(v)).sum()) if v.dtype.kind == "f" else int(sum(x == "" for x in v))


def describe(reader: StoreReader) -> str:
    """The facts of :func:`store_facts` as the text of ``hoverlay info``."""
    return describe_facts(store_facts(reader))


def describe_facts(f: dict[str, Any]) -> str:
    images = f["images"]
    lines = [
        f"store      {f['store']}",
        f"format     hoverlay v{f['format']['version']} (written by hoverlay {f['format']['tool_version']})",
        f"model      {f['model'].get('spec')} (weights: {f['model'].get('weights')})",
        f"input      {f['image_size']}x{f['image_size']} px, {f['preprocessing'].get('normalization')}",
        f"images     {images['committed']} committed ({images['ok']} ok, {images['failed']} failed), "
        f"updated {f['updated']}",
        f"size       {f['size_bytes'] / 1e6:.1f} MB on disk",
        "layers",
    ]
    for name, g in f["layers"].items():
        meta = g["index"]
        if meta is None:
            idx = "no index"
        else:
            stale = f", STALE: covers {meta['images_indexed']} images" if meta["stale"] else ""
            rec = meta["recall"]
            took = f" p50 {rec['p50_ms']:.1f} ms" if rec is not None and rec["p50_ms"] is not None else ""
            via = f" re-rank file {meta['rerank_file_bytes'] / 1e6:.1f} MB" if meta["rerank_file_bytes"] else ""
            value = "nan" if rec is None or rec["value"] is None else f"{rec['value']:.3f}"
            recall = f"recall@{rec['k']}={value}" if rec is not None else "recall not measured"
            idx = (f"index {meta['factory']} ntotal={meta['ntotal']} "
                   f"file {meta['file_bytes'] / 1e6:.1f} MB {recall}{took}{via}{stale}")
        lines.append(f"  {name:<24} H={g['height']:<3} W={g['width']:<3} D={g['dim']:<5} {idx}")
    if f["labels"]:
        lines.append("labels     " + ", ".join(f"{lab} ({c})" for lab, c in f["labels"].items()))
    for path, shards in (f.get("missing_shards") or {}).items():
        shown = ", ".join(map(str, shards[:8])) + (", …" if len(shards) > 8 else "")
        lines.append(f"DAMAGED    {path}: shard file(s) {shown} missing (run `hoverlay check`)")
    if f.get("metadata"):
        lines.append("metadata   " + ", ".join(
            f"{col} ({'number' if m['kind'] == 'float64' else 'text'}, {m['missing']} missing)"
            for col, m in f["metadata"].items()))
    return "\n".join(lines)
