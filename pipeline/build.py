"""``hoverlay build``: images -> model -> activations -> store (+ FAISS indexes), as a Dask job.

The job runs in *waves*: each wave is a few shard-aligned partitions computed in parallel
(any Dask scheduler), followed by one commit. A killed run therefore loses at most one wave,
and the next run — which skips every committed content hash — finishes the job with the
same rows in the same order as an uninterrupted run would have.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from hoverlay.options import KEYWORD
from hoverlay.stores import (
    LayerGeometry,
    StoreReader,
    StoreWriter,
    create_store,
    filesystem,
    normalize_url,
)
from hoverlay.stores.errors import NotAStoreError, StoreMismatchError
from hoverlay.stores.format import StoreAttrs
from hoverlay.stores.index import check_index_budget, read_index_meta
from hoverlay.stores.info import store_size_bytes
from hoverlay.stores.lock import LOCK_NAME, StoreLock
from hoverlay.stores.pixels import (
    DEFAULT_PIXEL_CODEC,
    PixelCodec,
    parse_quality,
    pixel_codec_problem,
)
from hoverlay.stores.urls import storage_options_for
from hoverlay.stores.writer import metadata_mismatch

from .errors import BuildUsageError, PipelineError, SourceError
from .indexing import IndexUpdate, default_index_budget, update_index
from .metadata import Metadata, read_metadata
from .models import ModelAdapter, load_model, resolve_device
from .options import BUILD_OPTIONS, DEFAULT_MODEL
from .partition import plan_partitions, select_new, waves
from .phases import add_phases
from .preprocess import JPEG_DRAFT_GAP, draft_size
from .progress import Phase, ProgressReporter
from .sources import Discovery, ImageSource, discover, hash_source
from .tasks import ModelRef, StoreRef, TaskItem, process_partition
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
    seconds: float = 0.0       # the whole run
    embed_seconds: float = 0.0   # decode + forward + write of the added images
    hash_seconds: float = 0.0
    index_seconds: float = 0.0
    committed: int = 0
    store_bytes: int = 0
    indexes: dict[str, IndexUpdate] = field(default_factory=dict)
    #: seconds per phase (:data:`~hoverlay.pipeline.phases.PHASES`), summed over the tasks'
    #: threads; ``dask`` is the workers' embedding time no task accounts for (idle, scheduling)
    phases: dict[str, float] = field(default_factory=dict)
    dashboard: str | None = None
    metadata_missing: int | None = None    # added images without a metadata row (None: no metadata)
    metadata_unmatched: int = 0            # metadata rows that matched no image

    @property
    def images_per_second(self) -> float:
        """The embedding rate (decode, forward, write), the one the progress bar shows."""
        return self.added / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def line(self) -> str:
        return (f"added {self.added} images ({len(self.failed)} failed), skipped {self.skipped} "
                f"already stored, {self.duplicates} duplicates, {self.ignored} ignored; embedding "
                f"{self.images_per_second:.1f} images/s ({self.embed_seconds:.1f}s); total "
                f"{self.seconds:.1f}s (hashing {self.hash_seconds:.1f}s, indexes "
                f"{self.index_seconds:.1f}s); store {self.store} now has {self.committed} images, "
                f"{self.store_bytes / 1e6:.1f} MB{self._metadata_text()}")

    def _metadata_text(self) -> str:
        if self.metadata_missing is None:
            return ""
        return (f"; metadata: {self.metadata_missing} added images had no row, "
                f"{self.metadata_unmatched} rows matched no image")


@dataclass
class BuildPlan:
    """Everything a build needs, checked before anything is written (see :func:`plan_build`)."""

    url: str
    options: dict[str, Any]
    adapter: ModelAdapter
    layers: list[str]
    size: int
    chunk: int
    existing: StoreAttrs | None
    found: Discovery
    sweep: list[tuple[str, float]]
    geometry: dict[str, LayerGeometry] | None  # for a new store
    pixels: PixelCodec = field(default_factory=PixelCodec)  # a new store's pixel codec
    metadata: Metadata | None = None
    #: each found image's metadata row (None: none), aligned with ``found.images``
    metadata_rows: list[dict[str, Any] | None] = field(default_factory=list)
    metadata_unmatched: int = 0

    @property
    def metadata_kinds(self) -> dict[str, str] | None:
        """The store columns the metadata file gives (its label goes to the label column)."""
        if self.metadata is None:
            return None
        return {c: k for c, k in self.metadata.kinds.items() if c != "label"}

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self.options["storage_options"]


def existing_store(url: str, storage_options: dict[str, Any] | None) -> StoreAttrs | None:
    """The attributes of the store at ``url``; None where nothing (or only a lock) is there yet.

    A regular file, or a folder holding other things, is refused: a build never turns a
    user's folder into a store by writing beside their files.
    """
    fs, path = filesystem(url, storage_options)
    path = path.rstrip("/")
    if fs.isfile(path):
        raise NotAStoreError(f"{url!r} is a file, not a store (a store is a folder); choose "
                             f"another --store")
    if fs.exists(f"{path}/zarr.json"):
        return StoreReader(url, storage_options=storage_options).attrs
    if fs.isdir(path):
        others = [e for e in fs.ls(path, detail=False) if e.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME]
        if others:
            raise NotAStoreError(f"{url!r} is a folder that is not a hoverlay store and not empty; "
                                 f"choose a new path for --store")
    return None


def plan_build(options: dict[str, Any]) -> BuildPlan:
    """Validate a whole build without writing: store, source, model, weights, layers, sweep.

    Model, weights, layers and input size default to an existing store's own, so a scheduled
    ``hoverlay build --images new/ --store s`` needs no other flag.
    """
    if not options["images"] or not options["store"]:
        missing = [k for k in ("images", "store") if not options[k]]
        raise BuildUsageError(f"a build needs {' and '.join(missing)} (flag --{missing[0]}, config "
                              f"key or keyword {missing[0]})")
    so = options["storage_options"]
    url = normalize_url(options["store"])
    existing = existing_store(url, so)
    try:
        sweep = transform_list(options["rotate"], options["scale"])
    except ValueError as exc:
        raise BuildUsageError(str(exc)) from None
    bad_scale = [p for kind, p in sweep if kind == "scale" and not 0 < p <= 1]
    if bad_scale:
        raise BuildUsageError(f"scale factors must be in (0, 1]; --scale {options['scale']!r} "
                              f"gives {bad_scale[0]:g}")
    found = discover(options["images"], so)
    if not found.images:
        shown = options["images"] if isinstance(options["images"], str) else ", ".join(options["images"])
        extra = (f" ({len(found.ignored)} other files ignored, e.g. {found.ignored[0]})"
                 if found.ignored else "")
        raise SourceError(f"no image files found in {shown!r}{extra}; nothing to build")

    spec = options["model"] or (existing.model.get("spec") if existing else None) or DEFAULT_MODEL
    if existing is not None and spec != existing.model.get("spec"):
        raise StoreMismatchError(f"store {url!r} was built with model {existing.model.get('spec')!r}, "
                                 f"not {spec!r}; build another store for another model")
    weights = options["weights"] or (existing.model.get("weights") if existing else None)
    device = resolve_device(options["device"])
    adapter = load_model(spec, weights, device)
    layers = list(options["layers"] or (list(existing.layers) if existing else adapter.default_layers))
    adapter.check_layers(layers)
    size = int(options["size"] or (existing.image_size if existing else adapter.image_size))
    chunk = existing.chunk if existing else int(options["chunk"])
    geometry = None
    if existing is None:
        geometry = adapter.layer_geometry(layers, size)
    plan = BuildPlan(url, options, adapter, layers, size, chunk, existing, found, sweep, geometry,
                     _plan_pixels(url, options, existing))
    if options["metadata"]:
        _plan_metadata(plan, read_metadata(options["metadata"], so))
    return plan


def _plan_pixels(url: str, options: dict[str, Any], existing: StoreAttrs | None) -> PixelCodec:
    """The pixel codec of a new store (``pixel_codec``, ``pixel_quality``), checked before any
    work; for an existing store its own, and a codec or quality asked for that is not the
    store's is refused (its pixels are all encoded one way)."""
    asked_codec, asked_quality = options["pixel_codec"], options["pixel_quality"]
    codec = asked_codec or (existing.pixels.codec if existing else DEFAULT_PIXEL_CODEC)
    if asked_quality is None and existing is not None and codec == existing.pixels.codec:
        quality: int | str = existing.pixels.quality
    else:
        quality = parse_quality(asked_quality, codec)
    problem = pixel_codec_problem(codec, quality)
    if problem:
        raise BuildUsageError(f"{problem} (--pixel-codec {codec}, --pixel-quality {quality})")
    pixels = PixelCodec(codec, quality)
    if existing is not None and (asked_codec or asked_quality is not None) and pixels != existing.pixels:
        raise StoreMismatchError(f"store {url!r} keeps its pixels as {existing.pixels.describe()}, not "
                                 f"{pixels.describe()}: --pixel-codec and --pixel-quality choose a new "
                                 f"store's (leave them out to append)")
    return existing.pixels if existing is not None else pixels


def _plan_metadata(plan: BuildPlan, metadata: Metadata) -> None:
    """Join a metadata file to the found images (before any write): rows per image, labels."""
    plan.metadata = metadata
    if plan.existing is not None:
        problem = metadata_mismatch(plan.url, plan.existing.metadata, plan.metadata_kinds)
        if problem:
            raise StoreMismatchError(problem)
    rows, plan.metadata_unmatched = metadata.join(plan.found.images)
    plan.metadata_rows = rows
    if "label" in metadata.kinds:  # the file's label replaces the folder's
        images = [dataclasses.replace(image, label=str(row["label"])) if row is not None else image
                  for image, row in zip(plan.found.images, rows, strict=True)]
        plan.found = dataclasses.replace(plan.found, images=images)


#: The threaded scheduler's forwards overlap, each on its share of the cores (``torch.set_num_threads
#: (cpus // workers)``), instead of one forward at a time on all of them (measured in
#: docs/performance.md, "Where a build's time goes").
CONCURRENT_THREAD_FORWARDS = True


class _Scheduler:
    """Where partitions run: local threads, a LocalCluster, or a cluster address.

    :meth:`stream` keeps a window of partitions in flight and hands their results back in order,
    so a wave's commit never waits for the next wave to start: a worker that finishes its last
    partition of a wave goes on with the next one (the old wave-by-wave ``dask.compute`` left
    every worker idle at each wave's end while the last partition was written)."""

    def __init__(self, spec: str, workers: int | None, stack: ExitStack):
        self.spec = spec
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.client: Any = None
        self.dashboard: str | None = None
        self._stack = stack
        if spec in ("threads", "sync"):
            return
        from distributed import Client, LocalCluster

        if spec == "processes":
            cluster = stack.enter_context(LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                                       processes=True, dashboard_address=":0"))
            self.client = stack.enter_context(Client(cluster))
        else:
            try:
                self.client = stack.enter_context(Client(spec, timeout="10s"))
            except OSError as exc:
                raise PipelineError(f"cannot reach the Dask scheduler {spec!r}: {exc}") from None
            self.workers = max(1, sum(w["nthreads"] for w in self.client.scheduler_info()["workers"].values()))
        self.dashboard = getattr(self.client, "dashboard_link", None)

    @property
    def in_process(self) -> bool:
        """Tasks run in this process (they may call back into the progress bar)."""
        return self.client is None

    @property
    def torch_threads(self) -> int | None:
        """``torch.set_num_threads`` for the processes that run forwards (None: leave it)."""
        cpus = os.cpu_count() or 1
        if self.spec == "threads":
            return max(1, cpus // self.workers) if CONCURRENT_THREAD_FORWARDS else None
        if self.spec == "processes":
            return max(1, cpus // self.workers)
        return None  # sync: every core; a cluster's worker: its nanny's OMP_NUM_THREADS (1)

    @property
    def concurrent_forwards(self) -> bool:
        """Whether a process's task threads may run forwards at once (each on its share)."""
        return self.spec != "threads" or CONCURRENT_THREAD_FORWARDS

    def compute(self, tasks: list[Any], phase: Phase | None = None,
                count: Callable[[Any], int] = len) -> list[Any]:
        """Results in task order. On a cluster, ``phase`` advances by ``count(result)`` as each
        task finishes (in-process tasks report their own progress as they go)."""
        if self.client is None:
            return list(dask.compute(*tasks, scheduler=self.spec, num_workers=self.workers))
        from distributed import as_completed

        futures = self.client.compute(tasks)
        for done in as_completed(futures):
            if phase is not None:
                phase.update(count(done.result()))
        return [f.result() for f in futures]

    def stream(self, fn: Callable[..., Any], calls: Iterator[tuple[Any, ...]],
               window: int) -> Generator[Any, None, None]:
        """``fn(*call)`` for every call, at most ``window`` in flight, results in call order.

        Leaving the loop early (an error, ``stop_after_waves``) cancels what has not started
        and waits for what has, so no task writes after the build has moved on."""
        window = max(1, window)
        if self.spec == "sync":
            for call in calls:
                yield fn(*call)
            return
        if self.client is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hoverlay-build")
            submit: Callable[[tuple[Any, ...]], Any] = lambda call: pool.submit(fn, *call)  # noqa: E731
        else:
            submit = lambda call: self.client.submit(fn, *call, pure=False)  # noqa: E731
        pending: collections.deque[Any] = collections.deque()
        try:
            for call in calls:
                pending.append(submit(call))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            if self.client is None:
                pool.shutdown(wait=True, cancel_futures=True)


def build(images: str | os.PathLike[str] | list[str] | None = None,
          store: str | os.PathLike[str] | None = None, **options: Any) -> BuildSummary:
    """Add every new image under ``images`` to ``store`` and bring its indexes up to date.

    Keywords are the options of :data:`hoverlay.pipeline.options.BUILD_OPTIONS` (the same as
    the ``hoverlay build`` flags and config keys): each is checked before any work, and every
    error that makes the run pointless (bad value, missing source, unknown model or layer,
    weights that do not load, a store built with another model, a locked store, an
    ``index_memory`` below the smallest index of a layer) is raised before anything is
    written. Model, weights, layers and size default to an existing store's.

    ``rotate="0:360:15"`` / ``scale="0.5:1.0:0.1"`` also store, for every image, its rotated /
    rescaled copies as images of their own (table: base_id, transform, param).
    The one-line summary is printed to stderr (also with ``quiet``) and returned.
    """
    t0 = time.perf_counter()
    opts = BUILD_OPTIONS.resolve((KEYWORD, {"images": images, "store": store, **options}))
    plan = plan_build(opts)
    progress = ProgressReporter(quiet=opts["quiet"], interval=opts["progress_interval"])
    summary = run_build(plan, progress)
    summary.seconds = time.perf_counter() - t0
    with contextlib.suppress(Exception):  # the size is for the summary line; never fail over it
        summary.store_bytes = store_size_bytes(plan.url, plan.storage_options)
    print(summary.line(), file=sys.stderr, flush=True)
    return summary


def run_build(plan: BuildPlan, progress: ProgressReporter) -> BuildSummary:
    """Lock, hash, check the index budget, embed in waves (one commit each), then update the
    indexes.

    An existing store is locked first (another build's lock is refused before hashing). A new
    store is hashed first: the lock is a file in the store's folder, and the images to add
    (hence the index budget's check, :func:`_check_index_budget`) are known without it, so a
    build refused there leaves no folder behind."""
    opts, url, so = plan.options, plan.url, plan.storage_options
    summary = BuildSummary(store=url, ignored=len(plan.found.ignored))
    with ExitStack() as stack:
        if plan.existing is not None:
            lock = stack.enter_context(StoreLock(url, storage_options=so))  # refreshed by its heartbeat
        sched = _Scheduler(opts["scheduler"], opts["workers"], stack)  # unreachable: nothing created
        if sched.dashboard:
            summary.dashboard = sched.dashboard
            progress.note(f"Dask dashboard: {sched.dashboard}")

        t = time.perf_counter()
        hashed = _hash_all(plan.found.images, sched, so, progress)
        summary.hash_seconds = time.perf_counter() - t
        if plan.existing is None:  # nothing stored yet: every hash is new (duplicates aside)
            new_pos, _, _ = select_new([h for h, _ in hashed], {})
            items, _ = _expand_transforms(plan.found.images, hashed, new_pos, {}, 0, plan.sweep)
            _check_index_budget(plan, items, 0)
            lock = stack.enter_context(StoreLock(url, storage_options=so))
        writer = _open_or_create(plan)
        known = writer.known_hashes()
        new_pos, summary.skipped, summary.duplicates = select_new([h for h, _ in hashed], known)
        start = writer.committed
        items, positions = _expand_transforms(plan.found.images, hashed, new_pos, known, start, plan.sweep)
        if plan.existing is not None:
            _check_index_budget(plan, items, start)  # the store's first write is reserve(), below
        item_metadata = _item_metadata(plan, writer.attrs.metadata, positions)
        if plan.metadata is not None:
            summary.metadata_missing = sum(plan.metadata_rows[p] is None for p in positions)
            summary.metadata_unmatched = plan.metadata_unmatched
        writer.reserve(len(items))
        reserved = start + len(items)
        parts = plan_partitions(start, len(items), plan.chunk)
        ref = ModelRef(plan.adapter.spec, plan.adapter.weights, plan.adapter.device, sched.torch_threads,
                       sched.concurrent_forwards)
        store = StoreRef(url, so, writer.attrs.created, reserved,
                         draft_size(plan.size, writer.attrs.preprocessing))
        stop = opts["stop_after_waves"]
        wave_list = waves(parts, 2 * sched.workers)[:stop] if stop is not None else waves(parts, 2 * sched.workers)
        t = time.perf_counter()
        with progress.phase("embedding", len(items)) as phase, _torch_threads_restored():
            on_batch = phase.update if sched.in_process else None
            calls = ((store, lo, items[lo - start:hi - start], ref, plan.layers, plan.size, opts["batch_size"],
                      opts["max_pixels"], on_batch) for wave in wave_list for lo, hi in wave)
            results = stack.enter_context(contextlib.closing(
                sched.stream(process_partition, calls, window=2 * sched.workers)))
            for wave in wave_list:
                rows: list[dict[str, Any]] = []
                for _ in wave:
                    part = next(results)
                    if not sched.in_process:
                        phase.update(len(part))
                    rows += part.rows
                    add_phases(summary.phases, part.phases)
                t_table = time.perf_counter()
                writer.write_table(wave[0][0], rows)
                if item_metadata is not None:
                    lo, hi = wave[0][0] - start, wave[-1][1] - start
                    writer.write_metadata(wave[0][0], {c: v[lo:hi] for c, v in item_metadata.items()})
                lock.check()  # taken over, or not refreshed for a while: never commit then
                writer.commit(wave[-1][1])
                summary.phases["table"] = summary.phases.get("table", 0.0) + time.perf_counter() - t_table
                for row in rows:
                    if row["status"] != "ok":
                        summary.failed.append((row["source"], row["reason"]))
                        progress.note(f"failed: {row['source']}: {row['reason']}")
                summary.added += len(rows)
        summary.embed_seconds = time.perf_counter() - t
        busy = sum(v for k, v in summary.phases.items() if k != "table")
        summary.phases["dask"] = max(0.0, summary.embed_seconds * sched.workers - busy)
        summary.phases["hash"] = summary.hash_seconds * sched.workers
        summary.committed = writer.committed
        t = time.perf_counter()
        if opts["index"]:
            stale = _layers_needing_index(url, plan.layers, summary.committed, so)
            todo = plan.layers if (summary.added or opts["rebuild_index"]) else stale
            if todo:
                reader = StoreReader(url, storage_options=so)
                for layer in todo:
                    summary.indexes[layer] = update_index(
                        reader, layer, memory_budget=opts["index_memory"], rebuild=opts["rebuild_index"],
                        k=opts["recall_k"], device=plan.adapter.device, progress=progress)
        summary.index_seconds = time.perf_counter() - t
    return summary


def _check_index_budget(plan: BuildPlan, items: list[TaskItem], committed: int) -> None:
    """Refuse an ``--index-memory`` below the smallest index of a layer the index phase will
    build, before the build writes anything (:func:`stores.index.check_index_budget`, the check
    the index phase repeats on what was committed).

    Each layer's size is known before the forward: (images committed + ``items``) x H x W
    vectors of its geometry; images that fail to decode later only make the index smaller (the
    smallest index never shrinks as vectors are added), so passing here means passing there.
    The layers checked are those the index phase updates: every layer when images are added or
    ``rebuild_index`` is set, else those whose index is missing or stale."""
    opts = plan.options
    if not opts["index"]:
        return
    if items or opts["rebuild_index"]:
        layers = plan.layers
    else:
        layers = _layers_needing_index(plan.url, plan.layers, committed, plan.storage_options)
    if not layers:
        return
    budget = opts["index_memory"] if opts["index_memory"] is not None else default_index_budget()
    geometry = plan.geometry if plan.existing is None else plan.existing.layers
    assert geometry is not None
    committed_ok = 0
    if committed:
        committed_ok = int(StoreReader(plan.url, storage_options=plan.storage_options).table().ok.sum())
    ok_images = committed_ok + sum(1 for item in items if not item.error)  # at most: some may fail to decode
    rows = committed + len(items)
    sizes: dict[str, tuple[int, int, int | None]] = {}
    for layer in layers:
        g = geometry[layer]
        sizes[layer] = (ok_images * g.patches_per_image, g.dim, rows * g.patches_per_image)
    check_index_budget(budget, sizes)


@contextlib.contextmanager
def _torch_threads_restored() -> Iterator[None]:
    """The threaded build sets this process's torch threads (its tasks' share of the cores);
    the caller's setting comes back after it."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _open_or_create(plan: BuildPlan) -> StoreWriter:
    """A new store (JPEG draft decoding on, the plan's pixel codec), or the existing one checked
    against the plan: an existing store decodes as it always did (``jpeg_draft`` only where
    its preprocessing says so), so appending never mixes two decodes of the same kind of file."""
    adapter = plan.adapter
    preprocessing = adapter.preprocessing() | {"size": plan.size}
    if plan.existing is None:
        assert plan.geometry is not None
        # the store's S3 defaults (bounded requests, one GET per small object), as open_root's
        so = storage_options_for(plan.url, plan.storage_options, small_objects=True)
        return create_store(plan.url, model=adapter.describe(),
                            preprocessing=preprocessing | {"jpeg_draft": JPEG_DRAFT_GAP},
                            image_size=plan.size, layers=plan.geometry, chunk=plan.chunk,
                            storage_options=so, metadata=plan.metadata_kinds, pixels=plan.pixels)
    if "jpeg_draft" in plan.existing.preprocessing:
        preprocessing["jpeg_draft"] = plan.existing.preprocessing["jpeg_draft"]
    writer = StoreWriter.open(plan.url, storage_options=plan.storage_options)
    writer.check_compatible(model=adapter.describe(), preprocessing=preprocessing, image_size=plan.size,
                            layers=plan.layers)
    writer.check_metadata(plan.metadata_kinds)
    return writer


def _item_metadata(plan: BuildPlan, kinds: dict[str, str], positions: list[int]) -> dict[str, list[Any]] | None:
    """Each new row's value of every metadata column of the store (transformed copies get their
    image's), or None for a store without metadata columns."""
    if not kinds:
        return None
    rows = [plan.metadata_rows[p] if plan.metadata_rows else None for p in positions]
    return {col: [row[col] if row is not None else (np.nan if kind == "float64" else "") for row in rows]
            for col, kind in kinds.items()}


def _expand_transforms(sources: list[Any], hashed: list[tuple[str, str]], new_pos: list[int],
                       known: dict[str, int], start: int,
                       sweep: list[tuple[str, float]]) -> tuple[list[TaskItem], list[int]]:
    """Rows to add: each new image followed by its missing transformed copies, and for each row
    the position of its source image.

    Copies of an image stored by an earlier run (e.g. a wider sweep this time) point at its
    existing row; copies already stored are skipped like any other content hash.
    """
    items: list[TaskItem] = []
    sources_of: list[int] = []
    new_set = set(new_pos)
    seen = set(known)
    positions = range(len(sources)) if sweep else new_pos
    for p in positions:
        h, err = hashed[p]
        src = sources[p]
        if p in new_set:
            base_id = start + len(items)
            items.append(TaskItem(src.uri, src.label, h, err))
            sources_of.append(p)
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
            sources_of.append(p)
    return items, sources_of


def _layers_needing_index(url: str, layers: list[str], committed: int,
                          storage_options: dict[str, Any] | None) -> list[str]:
    """Layers whose index is missing, unreadable or covers fewer images than are committed."""
    out = []
    for layer in layers:
        try:
            meta = read_index_meta(url, layer, storage_options)
        except (OSError, ValueError):
            meta = None
        if meta is None or meta.images_indexed != committed:
            out.append(layer)
    return out


def _hash_all(sources: list[ImageSource], sched: _Scheduler, storage_options: dict[str, Any] | None,
              progress: ProgressReporter) -> list[tuple[str, str]]:
    """Content hashes of every discovered file, computed in parallel batches (I/O bound)."""
    if not sources:
        return []
    per_task = max(1, min(64, len(sources) // (4 * sched.workers) + 1))
    with progress.phase("hashing", len(sources), unit="files") as phase:
        on_file = phase.update if sched.in_process else None
        tasks = [dask.delayed(_hash_batch, pure=False)([s.uri for s in sources[i:i + per_task]],
                                                       storage_options, on_file)
                 for i in range(0, len(sources), per_task)]
        return [h for batch in sched.compute(tasks, phase) for h in batch]


def _hash_batch(uris: list[str], storage_options: dict[str, Any] | None,
                on_file: Callable[[int], None] | None = None) -> list[tuple[str, str]]:
    out = []
    for u in uris:
        out.append(hash_source(u, storage_options))
        if on_file is not None:
            on_file(1)
    return out
