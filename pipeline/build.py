"""``hoverlay build``: images -> model -> activations -> store (+ FAISS indexes), as a Dask job.

The job runs in *waves*: each wave is a few shard-aligned partitions computed in parallel
(any Dask scheduler), followed by one commit. A killed run therefore loses at most one wave,
and the next run — which skips every committed content hash — finishes the job with the
same rows in the same order as an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import dask
import fsspec

from stores import StoreReader, StoreWriter, create_store
from stores._zarr import normalize_url
from stores.errors import NotAStoreError
from stores.lock import StoreLock

from .indexing import update_index
from .models import DEFAULT_MODEL, load_model, resolve_device
from .partition import plan_partitions, select_new, waves
from .preprocess import MAX_PIXELS
from .progress import Progress
from .sources import discover, hash_source
from .tasks import ModelRef, TaskItem, process_partition
from .transforms import transform_list

log = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    store: str
    added: int = 0
    skipped: int = 0           # content already in the store
    duplicates: int = 0        # same content twice within this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)
    ignored: int = 0           # files without an image extension
    seconds: float = 0.0
    committed: int = 0
    store_bytes: int = 0
    indexes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"added {self.added} images ({len(self.failed)} failed), skipped {self.skipped} "
                f"already stored, {self.duplicates} duplicates, {self.ignored} ignored; "
                f"{self.seconds:.1f}s, {self.images_per_second:.1f} images/s; store {self.store} "
                f"now has {self.committed} images, {self.store_bytes / 1e6:.1f} MB")


def _store_bytes(url: str, storage_options: dict[str, Any] | None) -> int:
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return int(fs.du(path))
    except Exception:
        return 0


def _open_or_create(url: str, adapter: Any, layers: list[str], size: int, chunk: int,
                    storage_options: dict[str, Any] | None) -> StoreWriter:
    preprocessing = adapter.preprocessing() | {"size": size}
    try:
        writer = StoreWriter.open(url, storage_options=storage_options)
    except NotAStoreError:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if fs.exists(path + "/zarr.json"):
            raise
        geometry = adapter.layer_geometry(layers) if size == adapter.image_size else \
            _geometry_at(adapter, layers, size)
        return create_store(url, model=adapter.describe(), preprocessing=preprocessing, image_size=size,
                            layers=geometry, chunk=chunk, storage_options=storage_options)
    writer.check_compatible(model=adapter.describe(), preprocessing=preprocessing, image_size=size,
                            layers=layers)
    return writer


def _geometry_at(adapter: Any, layers: list[str], size: int) -> dict[str, Any]:
    import numpy as np

    from stores import LayerGeometry

    acts = adapter.extract(np.zeros((1, size, size, 3), np.uint8), layers)
    return {n: LayerGeometry(*map(int, a.shape[1:])) for n, a in acts.items()}


class _Scheduler:
    """Where waves run: the local threaded scheduler, a LocalCluster, or a cluster address."""

    def __init__(self, spec: str, workers: int | None, stack: ExitStack):
        self.spec = spec
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.client = None
        if spec in ("threads", "sync"):
            return
        from distributed import Client, LocalCluster

        if spec in ("processes", "local-cluster"):
            cluster = stack.enter_context(LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                                       processes=True, dashboard_address=None))
            self.client = stack.enter_context(Client(cluster))
        elif "://" in spec or ":" in spec:
            self.client = stack.enter_context(Client(spec))
            self.workers = max(1, sum(w["nthreads"] for w in self.client.scheduler_info()["workers"].values()))
        else:
            raise ValueError(f"unknown scheduler {spec!r}; use threads, sync, processes or an address "
                             f"like tcp://host:8786")

    @property
    def torch_threads(self) -> int | None:
        if self.client is None:
            return None  # one process: the forward lock serialises, torch uses every core
        return max(1, (os.cpu_count() or 1) // self.workers) if self.spec in ("processes", "local-cluster") else None

    def compute(self, tasks: list[Any]) -> list[Any]:
        if self.client is not None:
            return list(self.client.compute(tasks, sync=True))
        return list(dask.compute(*tasks, scheduler=self.spec, num_workers=self.workers))


def build(
    images: str | Sequence[str],
    store: str,
    *,
    model: str = DEFAULT_MODEL,
    weights: str | None = None,
    layers: Sequence[str] | str | None = None,
    size: int | None = None,
    batch_size: int = 16,
    chunk: int = 16,
    scheduler: str = "threads",
    workers: int | None = None,
    device: str = "cpu",
    index: bool = True,
    index_memory: int | None = None,
    rebuild_index: bool = False,
    recall_k: int = 10,
    max_pixels: int = MAX_PIXELS,
    quiet: bool = False,
    storage_options: dict[str, Any] | None = None,
    rotate: str | None = None,
    scale: str | None = None,
    stop_after_waves: int | None = None,
) -> BuildSummary:
    """Add every new image under ``images`` to ``store`` and bring its indexes up to date.

    Errors that make the whole run pointless (unknown model or layer, a store built with
    another model, a locked store) are raised before any image is read.

    ``rotate="0:360:15"`` / ``scale="0.5:1.0:0.1"`` also store, for every image, its rotated /
    rescaled copies as images of their own (table: base_id, transform, param).
    """
    t0 = time.perf_counter()
    url = normalize_url(store)
    adapter = load_model(model, weights, device)
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    layer_list = list(layers) if layers else list(adapter.default_layers)
    adapter.check_layers(layer_list)
    size = int(size or adapter.image_size)
    summary = BuildSummary(store=url)
    with ExitStack() as stack:
        stack.enter_context(StoreLock(url, storage_options=storage_options))
        writer = _open_or_create(url, adapter, layer_list, size, chunk, storage_options)
        chunk = writer.attrs.chunk  # an existing store keeps its own shard size
        found = discover(images, storage_options)
        summary.ignored = len(found.ignored)
        sched = _Scheduler(scheduler, workers, stack)
        progress = Progress(quiet=quiet)

        hashed = _hash_all(found.images, sched, storage_options)
        known = writer.known_hashes()
        new_pos, summary.skipped, summary.duplicates = select_new([h for h, _ in hashed], known)
        start = writer.committed
        items = _expand_transforms(found.images, hashed, new_pos, known, start, transform_list(rotate, scale))
        writer.reserve(len(items))
        parts = plan_partitions(start, len(items), chunk)
        ref = ModelRef(model, weights, device, sched.torch_threads)
        progress.start(len(items))
        for n_wave, wave in enumerate(waves(parts, 2 * sched.workers)):
            if stop_after_waves is not None and n_wave >= stop_after_waves:
                break
            tasks = [dask.delayed(process_partition, pure=False)(
                url, lo, items[lo - start:hi - start], ref, layer_list, size, batch_size,
                storage_options, max_pixels) for lo, hi in wave]
            results = sched.compute(tasks)
            rows = [row for part in results for row in part]
            writer.write_table(wave[0][0], rows)
            writer.commit(wave[-1][1])
            for row in rows:
                if row["status"] != "ok":
                    summary.failed.append((row["source"], row["reason"]))
                    progress.note(f"failed: {row['source']}: {row['reason']}")
            summary.added += len(rows)
            progress.update(len(rows))
        progress.finish()
        summary.committed = writer.committed
        if index and (summary.added or rebuild_index or not _has_indexes(url, layer_list, storage_options)):
            reader = StoreReader(url, storage_options=storage_options)
            for layer in layer_list:
                summary.indexes[layer] = update_index(reader, layer, memory_budget=index_memory,
                                                      rebuild=rebuild_index, k=recall_k,
                                                      device=resolve_device(device))
    summary.seconds = time.perf_counter() - t0
    summary.store_bytes = _store_bytes(url, storage_options)
    if not quiet:
        print(summary.line(), file=sys.stderr)
    return summary


def _expand_transforms(sources: list[Any], hashed: list[tuple[str, str]], new_pos: list[int],
                       known: dict[str, int], start: int, sweep: list[tuple[str, float]]) -> list[TaskItem]:
    """Rows to add: each new image followed by its missing transformed copies.

    Copies of an image stored by an earlier run (e.g. a wider sweep this time) point at its
    existing row; copies already stored are skipped like any other content hash.
    """
    items: list[TaskItem] = []
    new_set = set(new_pos)
    seen = set(known)
    positions = range(len(sources)) if sweep else new_pos
    for p in positions:
        h, err = hashed[p]
        src = sources[p]
        if p in new_set:
            base_id = start + len(items)
            items.append(TaskItem(src.uri, src.label, h, err))
        elif h in known:
            base_id = known[h]
        else:
            continue  # a duplicate within this run
        for kind, param in sweep:
            ch = f"{h}|{kind}:{param:g}"
            if ch in seen:
                continue
            seen.add(ch)
            items.append(TaskItem(src.uri, src.label, ch, err, kind, float(param), base_id))
    return items


def _has_indexes(url: str, layers: list[str], storage_options: dict[str, Any] | None) -> bool:
    from stores.index import index_path

    for layer in layers:
        fs, path = fsspec.core.url_to_fs(index_path(url, layer) + ".json", **(storage_options or {}))
        if not fs.exists(path):
            return False
    return True


def _hash_all(sources: list[Any], sched: _Scheduler, storage_options: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Content hashes of every discovered file, computed in parallel batches (I/O bound)."""
    if not sources:
        return []
    per_task = max(1, len(sources) // (4 * sched.workers) + 1)
    tasks = [dask.delayed(_hash_batch, pure=False)([s.uri for s in sources[i:i + per_task]], storage_options)
             for i in range(0, len(sources), per_task)]
    return [h for batch in sched.compute(tasks) for h in batch]


def _hash_batch(uris: list[str], storage_options: dict[str, Any] | None) -> list[tuple[str, str]]:
    return [hash_source(u, storage_options) for u in uris]
