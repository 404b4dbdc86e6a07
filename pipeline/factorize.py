"""``hoverlay factorize``: NMF groups of a layer's patch activations, out of core, into the store.

The input of the factorisation is the *un-normalised* activation ``a = vector × norm`` of every
patch of the chosen images. Block outputs such as EfficientNet's ``_blocks.N.add`` have no
ReLU, so ``a`` has negative values; NMF needs ``X ≥ 0``, and the ``negative`` policy decides:

* ``clip`` (default): factorise ReLU(a) = max(a, 0). Groups then describe what is *present* at
  a patch; the fraction of L1 mass that was negative (and dropped) is reported and stored.
* ``shift``: factorise ``a + s`` with the per-channel shift ``s = max(0, -min a)`` measured in an
  extra pass; nothing is lost, but "absent" becomes a positive baseline shared by all patches.
* ``error``: refuse (:class:`~pipeline.nmf_kernels.NegativeActivationsError`, naming the layer).

Passes over the selected images, each reading ``batch_images`` images at a time (never the whole
matrix): [shift only: one statistics pass], 1..``epochs`` fitting passes
(``MiniBatchNMF.partial_fit``, images shuffled per epoch), one pass that transforms and writes.
Results go to ``layers/<layer>/groups`` and ``group_weights`` (see :mod:`stores.groups`); the
attributes of ``groups`` are written last so readers never see a half-written factorisation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from stores import StoreReader, StoreWriter, open_store
from stores.errors import OutOfRangeError
from stores.format import STATUS_OK, TABLE, TABLE_COLUMNS, layer_path
from stores.groups import GROUP_WEIGHTS, GROUPS, GROUPS_FORMAT_VERSION, NO_GROUP
from stores.lock import StoreLock
from stores.table import ImageTable

from .progress import Progress

METHOD = "MiniBatchNMF"

#: Human-readable input of the factorisation per policy, stored with the result.
INPUT_DESCRIPTION = {
    "clip": "max(vector*norm, 0): NMF of ReLU(a); negative activations set to 0",
    "shift": "vector*norm + shift: per-channel shift so the smallest value seen is 0",
    "error": "vector*norm: the layer had no negative activations",
}

#: Longest ``images`` description stored; explicit id lists beyond this are summarised.
MAX_DESCRIPTION = 200


class FactorizeUsageError(ValueError):
    """Bad arguments or an image filter that selects nothing: the user has to change the call."""


# ------------------------------------------------------------------------------ image selection
def parse_ids(text: str) -> list[int]:
    """'0-9,12,15' -> [0, ..., 9, 12, 15] (ranges inclusive, like a print dialog)."""
    ids: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise FactorizeUsageError(f"bad image id or range {part!r} in {text!r}") from None
    return ids


def describe_ids(ids: np.ndarray) -> str:
    """Sorted ids as compact ranges ('ids=0-9,12'), shortened to fit in the stored attributes."""
    ids = np.unique(ids)
    runs = [str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}" for lo, hi in _runs(ids)]
    text = "ids=" + ",".join(runs)
    if len(text) > MAX_DESCRIPTION:
        text = f"ids={len(ids)} images from {ids[0]} to {ids[-1]} (list shortened)"
    return text


class _TableColumns:
    """Table columns read one at a time, on demand: a filter on labels must not load every
    column (sources, hashes) of a million-image table as Python strings."""

    def __init__(self, reader: StoreReader):
        self.reader = reader
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.reader.n_images

    def __getitem__(self, column: str) -> np.ndarray:
        if column not in self._cache:
            arr = self.reader.group[f"{TABLE}/{column}"]
            assert isinstance(arr, zarr.Array)
            # object, like ImageTable: zarr returns numpy's StringDType, which few numpy functions take
            self._cache[column] = np.asarray(arr[: self.reader.n_images]).astype(object)
        return self._cache[column]


def _filter_mask(table: ImageTable | _TableColumns, text: str) -> np.ndarray:
    """'label=a,b&transform=none' -> boolean mask over the table (string columns only)."""
    mask = np.ones(len(table), dtype=bool)
    for condition in filter(None, (c.strip() for c in text.split("&"))):
        column, sep, values = condition.partition("=")
        column = column.strip()
        if not sep or TABLE_COLUMNS.get(column) != "str" or column == "status":
            names = [c for c, kind in TABLE_COLUMNS.items() if kind == "str" and c != "status"]
            raise FactorizeUsageError(f"bad image filter {condition!r}: expected COLUMN=VALUE[,VALUE] "
                                      f"with COLUMN one of {names}, or ids like 0-99,120")
        wanted = {v.strip() for v in values.split(",")}
        mask &= np.isin(np.asarray(table[column], dtype=object), list(wanted))
    return mask


def select_images(table: ImageTable | _TableColumns,
                  images: str | Sequence[int] | np.ndarray | None) -> tuple[np.ndarray, str, int]:
    """(sorted ok image ids, description for the attributes, failed images left out).

    ``images``: None or "all" for every ok image; a filter like ``"label=animals"`` (several
    values with commas, several conditions with ``&``); ``"ids=0-9,12"`` or ``"0-9,12"``; or a
    sequence of ids. Failed images have zero vectors, so they are never factorised.
    """
    n = len(table)
    if images is None or (isinstance(images, str) and images.strip() in ("", "all")):
        chosen, description = np.ones(n, dtype=bool), "all"
    elif isinstance(images, str):
        text = images.strip()
        if text.startswith("ids=") or text[0].isdigit():
            chosen = _id_mask(parse_ids(text.removeprefix("ids=")), n)
            description = describe_ids(np.flatnonzero(chosen))
        else:
            chosen, description = _filter_mask(table, text), text
    else:
        chosen = _id_mask([int(i) for i in np.asarray(images).reshape(-1)], n)
        description = describe_ids(np.flatnonzero(chosen))
    good = np.asarray(table["status"], dtype=object) == STATUS_OK
    ok = chosen & good
    if not np.any(ok):
        raise FactorizeUsageError(f"no ok images match {description!r} "
                                  f"({int(chosen.sum())} selected, {n} in the store)")
    return np.flatnonzero(ok), description, int((chosen & ~good).sum())


def _id_mask(ids: Sequence[int], n: int) -> np.ndarray:
    """Boolean mask of explicit ids; an id outside the store is an error, not silently dropped."""
    arr = np.asarray(ids, dtype=np.int64)
    bad = (arr < 0) | (arr >= n)
    if np.any(bad):
        raise OutOfRangeError(f"image id {int(arr[bad][0])} is outside the {n} committed images")
    mask = np.zeros(n, dtype=bool)
    mask[arr] = True
    return mask


# ---------------------------------------------------------------------------------------- I/O
def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted ids -> [(start, stop)) runs of consecutive ids."""
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [ids.size]])
    return [(int(ids[a]), int(ids[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def _read_block(reader: StoreReader, layer: str, ids: np.ndarray) -> np.ndarray:
    """Raw activations (len(ids)·H·W, D) float32 of some sorted images: one minibatch in memory.

    Reads runs of consecutive ids as slices: Zarr's integer-array (orthogonal) selection on the
    sharded vectors allocates ~50x the bytes it returns and is slower than a few slice reads.
    """
    from .nmf_kernels import activations

    geo = reader.geometry(layer)
    out = np.empty((len(ids) * geo.patches_per_image, geo.dim), dtype=np.float32)
    row = 0
    for lo, hi in _runs(ids):
        part = activations(reader.vectors(layer, slice(lo, hi)), reader.norms(layer, slice(lo, hi)))
        out[row:row + len(part)] = part
        row += len(part)
    return out


def _batches(ids: np.ndarray, size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """Batches of ``size`` ids, shuffled when ``rng`` is given (so no minibatch is one label),
    sorted inside a batch so reads go through the store in order."""
    order = ids if rng is None else rng.permutation(ids)
    for lo in range(0, len(order), size):
        yield np.sort(order[lo:lo + size])


def _row_ranges(n: int, chunk: int, batch_images: int) -> Iterator[tuple[int, int]]:
    """Write ranges of whole shards (multiples of the store's ``chunk``), about ``batch_images`` long.

    Whole shards mean every output object is written exactly once, without read-modify-write.
    """
    step = max(chunk, batch_images - batch_images % chunk)
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _compressor() -> zarr.codecs.BloscCodec:
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def _create_arrays(group: zarr.Group, layer: str, n: int, h: int, w: int, k: int,
                   chunk: int) -> tuple[zarr.Array, zarr.Array]:
    """(Re)create both arrays empty; ``groups`` first, so readers see "absent" from now on."""
    groups = group.create_array(layer_path(layer, GROUPS), shape=(n, h, w), dtype="int16",
                                chunks=(chunk, h, w), compressors=_compressor(),
                                fill_value=NO_GROUP, overwrite=True)
    weights = group.create_array(layer_path(layer, GROUP_WEIGHTS), shape=(n, h, w, k),
                                 dtype="float16", chunks=(1, h, w, k), shards=(chunk, h, w, k),
                                 compressors=_compressor(), fill_value=0, overwrite=True)
    return groups, weights


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("hoverlay")
    except Exception:  # running from a source tree without installing
        return "0+unknown"


def _short(values: np.ndarray) -> list[float]:
    """float32 values as JSON floats with 7 significant digits (what float32 holds)."""
    return [float(f"{v:.7g}") for v in np.asarray(values, dtype=np.float32).reshape(-1)]


# ---------------------------------------------------------------------------------- factorize
def factorize(store: str | os.PathLike[str], layer: str, k: int = 6,
              images: str | Sequence[int] | np.ndarray | None = None, negative: str = "clip",
              batch_images: int = 64, epochs: int = 3, tol: float = 1e-3, seed: int = 0,
              quiet: bool = False, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Factorise ``layer``'s patch activations into ``k`` NMF groups and store them; returns a summary.

    Memory is O(batch_images · H · W · D), whatever the store size. Holds the store's writer
    lock (no build can append meanwhile). Negative activations follow ``negative`` (module
    docstring); the default ``clip`` means the groups are an NMF of ReLU(a). ``epochs`` is the
    most fitting passes; fitting stops earlier once the components move less than ``tol``
    (relative) over a pass.
    """
    from . import nmf_kernels as nk

    if negative not in nk.NEGATIVE_POLICIES:
        raise FactorizeUsageError(f"negative must be one of {nk.NEGATIVE_POLICIES}, got {negative!r}")
    if batch_images < 1 or epochs < 1:
        raise FactorizeUsageError(f"batch_images and epochs must be >= 1, got {batch_images}, {epochs}")
    t0 = time.perf_counter()
    reader = open_store(store, storage_options=storage_options)  # before locking: must exist
    geo = reader.geometry(layer)
    if not 1 <= k <= min(geo.dim, np.iinfo(np.int16).max):
        raise FactorizeUsageError(f"k must be between 1 and the layer's {geo.dim} channels, got {k}")
    with StoreLock(reader.url, storage_options=storage_options):
        reader.refresh()  # a build may have committed before we got the lock
        ids, description, skipped = select_images(_TableColumns(reader), images)
        progress = Progress(quiet=quiet)
        fit, stats, shift = _fit(reader, layer, ids, k, negative, batch_images, epochs, tol, seed,
                                 progress)
        components, _ = nk.unit_components(fit.model)
        group = StoreWriter.open(reader.url, storage_options=storage_options).group
        written = _transform_and_write(reader, group, layer, ids, fit.model, components, negative,
                                       shift, batch_images, progress)
        meta = {
            "format_version": GROUPS_FORMAT_VERSION,
            "k": k,
            "components": [_short(row) for row in components],
            "method": METHOD,
            "negative": negative,
            "input": INPUT_DESCRIPTION[negative],
            "shift": None if shift is None else _short(shift),
            "negative_mass_fraction": stats.negative_mass_fraction,
            "clipped_mass_fraction": stats.negative_mass_fraction if negative == "clip" else 0.0,
            "images": description,
            "images_factorized": int(len(ids)),
            "images_skipped_failed": skipped,
            "images_total": reader.n_images,
            "patches": int(len(ids) * geo.patches_per_image),
            "reconstruction_error": written["reconstruction_error"],
            "reconstruction_error_kind": "relative Frobenius ||X - WH|| / ||X|| over factorised patches",
            "group_sizes": written["group_sizes"],
            "patches_without_group": written["patches_without_group"],
            "epochs": fit.epochs,
            "steps": fit.steps,
            "last_epoch_change": fit.change if np.isfinite(fit.change) else None,
            "batch_images": batch_images,
            "seed": seed,
            "tool_version": _tool_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        written["groups"].attrs.update(meta)  # last: from here on readers see the new groups
    summary = {key: v for key, v in meta.items() if key not in ("components", "shift")}
    return summary | {"store": reader.url, "layer": layer, "seconds": time.perf_counter() - t0}


def _fit(reader: StoreReader, layer: str, ids: np.ndarray, k: int, negative: str,
         batch_images: int, epochs: int, tol: float, seed: int, progress: Progress) -> tuple[Any, Any, np.ndarray | None]:
    """(FitResult, InputStats of the raw activations, shift or None): all passes before writing.

    Statistics come from the first fitting epoch (one pass less), except for ``shift``, which
    needs the minima before the first block is fitted. The ``error`` policy raises during the
    first epoch, so nothing has been written when it does.
    """
    from . import nmf_kernels as nk

    geo = reader.geometry(layer)
    stats = nk.InputStats()
    shift = None
    if negative == "shift":
        progress.note(f"layer {layer}: measuring the per-channel minimum of {len(ids)} images")
        for batch in _batches(ids, batch_images):
            stats.update(_read_block(reader, layer, batch))
        assert stats.channel_min is not None  # ids is never empty (select_images)
        shift = nk.channel_shift(stats.channel_min)

    def epoch_blocks(epoch: int) -> Iterator[np.ndarray]:
        progress.note(f"layer {layer}: fitting k={k}, epoch {epoch + 1} of at most {epochs}")
        progress.start(len(ids))
        for batch in _batches(ids, batch_images, np.random.default_rng([seed, epoch])):
            block = _read_block(reader, layer, batch)
            if epoch == 0 and negative != "shift":
                stats.update(block)
            yield nk.make_nonnegative(block, negative, shift=shift, layer=layer)
            progress.update(len(batch))
        progress.finish()

    fit = nk.fit_blocks(epoch_blocks, k, total_rows=len(ids) * geo.patches_per_image,
                        rows_per_block=batch_images * geo.patches_per_image, epochs=epochs,
                        tol=tol, seed=seed)
    return fit, stats, shift


def _transform_and_write(reader: StoreReader, group: zarr.Group, layer: str, ids: np.ndarray,
                         model: Any, components: np.ndarray, negative: str, shift: np.ndarray | None,
                         batch_images: int, progress: Progress) -> dict[str, Any]:
    """Last pass: weights and groups of every selected image, written shard by shard."""
    from . import nmf_kernels as nk

    geo = reader.geometry(layer)
    k = components.shape[0]
    groups_arr, weights_arr = _create_arrays(group, layer, reader.n_images, geo.height, geo.width,
                                             k, reader.attrs.chunk)
    err_sq = norm_sq = 0.0
    sizes = np.zeros(k, dtype=np.int64)
    empty = 0
    progress.note(f"layer {layer}: writing groups of {len(ids)} images")
    progress.start(len(ids))
    for lo, hi in _row_ranges(reader.n_images, reader.attrs.chunk, batch_images):
        sel = ids[(ids >= lo) & (ids < hi)]
        if sel.size == 0:
            continue  # untouched chunks read as the fill values: group -1, weights 0
        block = nk.make_nonnegative(_read_block(reader, layer, sel), negative, shift=shift,
                                    layer=layer)
        weights = nk.transform_block(model, block)
        e, s = nk.squared_errors(block, weights, components)
        err_sq, norm_sq = err_sq + e, norm_sq + s
        labels = nk.assign_groups(weights)
        sizes += np.bincount(labels[labels >= 0], minlength=k)
        empty += int((labels < 0).sum())
        out_groups = np.full((hi - lo, geo.height, geo.width), NO_GROUP, dtype=np.int16)
        out_weights = np.zeros((hi - lo, geo.height, geo.width, k), dtype=np.float16)
        out_groups[sel - lo] = labels.reshape(len(sel), geo.height, geo.width)
        out_weights[sel - lo] = nk.to_float16(weights).reshape(len(sel), geo.height, geo.width, k)
        weights_arr[lo:hi] = out_weights
        groups_arr[lo:hi] = out_groups
        progress.update(len(sel))
    progress.finish()
    return {"groups": groups_arr,
            "reconstruction_error": float(np.sqrt(err_sq / norm_sq)) if norm_sq > 0 else 0.0,
            "group_sizes": [int(s) for s in sizes], "patches_without_group": empty}


# ---------------------------------------------------------------------------------------- CLI
def add_factorize_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``hoverlay factorize``."""
    p.add_argument("--store", required=True, help="store path or fsspec URL")
    p.add_argument("--layer", required=True, help="layer name, as in `hoverlay info`")
    p.add_argument("--k", type=int, default=6, help="number of groups (NMF components; default 6)")
    p.add_argument("--images", default=None,
                   help="which images: all (default), label=animals[,people][&transform=none], "
                        "or ids like 0-99,120; failed images are always left out (group -1)")
    p.add_argument("--negative", choices=("clip", "shift", "error"), default="clip",
                   help="negative activations (layers without ReLU): clip = NMF of ReLU(a), "
                        "the dropped mass fraction is reported (default); shift = add a "
                        "per-channel offset so the minimum is 0; error = refuse")
    p.add_argument("--batch-images", type=int, default=64,
                   help="images per minibatch: memory is about this many images' activations")
    p.add_argument("--epochs", type=int, default=3,
                   help="at most this many fitting passes (stops early when components settle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress (cron)")


def cmd_factorize(args: argparse.Namespace) -> int:
    """Run :func:`factorize` from parsed flags; prints one summary line on success."""
    from pipeline.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE
    from pipeline.nmf_kernels import NegativeActivationsError, NothingToFactorizeError

    try:
        s = factorize(args.store, args.layer, k=args.k, images=args.images, negative=args.negative,
                      batch_images=args.batch_images, epochs=args.epochs, seed=args.seed,
                      quiet=args.quiet)
    except FactorizeUsageError as exc:
        print(f"hoverlay factorize: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (NegativeActivationsError, NothingToFactorizeError) as exc:
        print(f"hoverlay factorize: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(f"factorised layer {s['layer']} of {s['store']}: k={s['k']} over "
          f"{s['images_factorized']} images ({s['images']}, {s['patches']} patches); negative="
          f"{s['negative']}, {100 * s['negative_mass_fraction']:.1f}% of activation mass negative"
          f"{' and clipped' if s['negative'] == 'clip' else ''}; relative reconstruction error "
          f"{s['reconstruction_error']:.3f}; group sizes {s['group_sizes']}; {s['epochs']} epochs, "
          f"{s['seconds']:.1f}s")
    return EXIT_OK
