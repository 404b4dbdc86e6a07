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

import datetime as _dt
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from hoverlay.options import KEYWORD
from hoverlay.stores import StoreReader, StoreWriter, open_store
from hoverlay.stores.errors import OutOfRangeError
from hoverlay.stores.format import STATUS_OK, TABLE, TABLE_COLUMNS
from hoverlay.stores.groups import NO_GROUP, GroupsWriter
from hoverlay.stores.lock import StoreLock
from hoverlay.stores.reader import consecutive_runs
from hoverlay.stores.table import ImageTable

from .errors import BuildUsageError
from .options import FACTORIZE_OPTIONS
from .progress import ProgressReporter

METHOD = "MiniBatchNMF"

#: Human-readable input of the factorisation per policy, stored with the result.
INPUT_DESCRIPTION = {
    "clip": "max(vector*norm, 0): NMF of ReLU(a); negative activations set to 0",
    "shift": "vector*norm + shift: per-channel shift so the smallest value seen is 0",
    "error": "vector*norm: the layer had no negative activations",
}

#: Longest ``images`` description stored; explicit id lists beyond this are summarised.
MAX_DESCRIPTION = 200


class FactorizeUsageError(BuildUsageError):
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
    runs = [str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}" for lo, hi in consecutive_runs(ids)]
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
def _read_block(reader: StoreReader, layer: str, ids: np.ndarray) -> np.ndarray:
    """Raw activations (len(ids)·H·W, D) float32 of some sorted images: one minibatch in memory.

    Reads runs of consecutive ids as slices: Zarr's integer-array (orthogonal) selection on the
    sharded vectors allocates ~50x the bytes it returns and is slower than a few slice reads.
    """
    from .nmf_kernels import activations

    geo = reader.geometry(layer)
    out = np.empty((len(ids) * geo.patches_per_image, geo.dim), dtype=np.float32)
    row = 0
    for lo, hi in consecutive_runs(ids):
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
def factorize(store: str | os.PathLike[str] | None = None, layer: str | None = None,
              **options: Any) -> dict[str, Any]:
    """Factorise ``layer``'s patch activations into ``k`` NMF groups and store them; returns a summary.

    Keywords are :data:`hoverlay.pipeline.options.FACTORIZE_OPTIONS` (``k``, ``images``,
    ``negative``, ``batch_images``, ``epochs``, ``tol``, ``seed``, ``quiet``,
    ``storage_options``), the same as the ``hoverlay factorize`` flags, checked before any work.
    ``images`` may also be a sequence of ids. Memory is O(batch_images · H · W · D), whatever the
    store size. Holds the store's writer lock (no build can append meanwhile). Negative
    activations follow ``negative`` (module docstring); the default ``clip`` means the groups
    are an NMF of ReLU(a). ``epochs`` is the most fitting passes; fitting stops earlier once the
    components move less than ``tol`` (relative) over a pass.
    """
    selection = options.pop("images", None)
    ids_given = selection is not None and not isinstance(selection, str)
    o = FACTORIZE_OPTIONS.resolve((KEYWORD, {"store": store, "layer": layer, **options,
                                             "images": None if ids_given else selection}))
    if not o["store"] or not o["layer"]:
        raise FactorizeUsageError("factorize needs a store and a layer (--store, --layer)")
    images = selection if ids_given else o["images"]
    store, layer, k, negative = o["store"], o["layer"], o["k"], o["negative"]
    batch_images, epochs, tol, seed = o["batch_images"], o["epochs"], o["tol"], o["seed"]
    storage_options = o["storage_options"]
    progress = ProgressReporter(quiet=o["quiet"])
    from . import nmf_kernels as nk

    t0 = time.perf_counter()
    reader = open_store(store, storage_options=storage_options)  # before locking: must exist
    geo = reader.geometry(layer)
    if not 1 <= k <= min(geo.dim, np.iinfo(np.int16).max):
        raise FactorizeUsageError(f"k must be between 1 and the layer's {geo.dim} channels, got {k}")
    with StoreLock(reader.url, storage_options=storage_options):
        reader.refresh()  # a build may have committed before we got the lock
        ids, description, skipped = select_images(_TableColumns(reader), images)
        advice = signed_layer_advice(reader, layer, ids, negative)
        if advice:  # before any work: the user may rather factorise another layer
            progress.write(f"hoverlay factorize: {advice}")
        fit, stats, shift = _fit(reader, layer, ids, k, negative, batch_images, epochs, tol, seed,
                                 progress)
        components, _ = nk.unit_components(fit.model)
        group = StoreWriter.open(reader.url, storage_options=storage_options).group
        out = GroupsWriter(group, layer, reader.n_images, geo.height, geo.width, k, reader.attrs.chunk)
        written = _transform_and_write(reader, out, layer, ids, fit.model, components, negative,
                                       shift, batch_images, progress)
        meta = {
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
            "signed_layer_advice": advice,
            "tool_version": _tool_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        out.finish(meta)  # last: from here on readers see the new groups
    summary = {key: v for key, v in meta.items() if key not in ("components", "shift")}
    return summary | {"store": reader.url, "layer": layer, "seconds": time.perf_counter() - t0}


#: Images whose vectors are looked at to tell whether a layer is signed.
SIGN_SAMPLE_IMAGES = 8


def signed_layer_advice(reader: StoreReader, layer: str, ids: np.ndarray, negative: str) -> str | None:
    """A warning when ``layer`` has negative activations, naming the nearest non-negative layer.

    NMF needs non-negative input: ``clip`` drops the negative mass (half of it on a residual
    block output), ``shift`` turns "absent" into a baseline. The nearest non-negative layer is
    one of the store's own when one is at the same resolution (no rebuild needed), else the
    model's (from its layer survey; a rebuild with ``--layers``). None for a non-negative layer.
    """
    sample = np.asarray(ids[:SIGN_SAMPLE_IMAGES])
    if not sample.size:
        return None
    acts = reader.vectors(layer, sample).astype(np.float32) * reader.norms(layer, sample)[..., None]
    negative_mass = float(-np.minimum(acts, 0).sum())
    if negative_mass <= 0:
        return None
    fraction = negative_mass / max(float(np.abs(acts).sum()), 1e-30)
    effect = {"clip": "negative=clip sets them to 0", "shift": "negative=shift adds a per-channel "
              "baseline", "error": "negative=error refuses"}.get(negative, negative)
    side = reader.geometry(layer).height
    own = [name for name in reader.layers if name != layer and reader.geometry(name).height == side
           and _non_negative(reader, name, sample)]
    if own:
        where = f"this store's layer {own[0]!r} is non-negative at the same {side}x{side} resolution"
    else:
        nearest = _model_nearest_non_negative(reader, layer)
        where = (f"the nearest non-negative layer of the model is {nearest} (rebuild with "
                 f"--layers to add it)") if nearest else "no non-negative layer of the model is known"
    return (f"layer {layer!r} is signed: {100 * fraction:.1f}% of its activation mass (in "
            f"{len(sample)} images) is negative and {effect}; NMF describes non-negative layers "
            f"best: {where}")


def _non_negative(reader: StoreReader, layer: str, sample: np.ndarray) -> bool:
    return bool(float(reader.vectors(layer, sample).min()) >= 0)


def _model_nearest_non_negative(reader: StoreReader, layer: str) -> str | None:
    """``'name' (D=…, H×W)`` of the model's non-negative layer nearest to ``layer``, or None
    when the model cannot be loaded here (its survey does not depend on the weights, so a
    torchvision or timm model is surveyed as a seeded random network)."""
    from .layer_survey import nearest_non_negative
    from .models import RANDOM_INIT_FAMILIES, load_model

    model = reader.model
    spec = str(model.get("spec", ""))
    weights = "none" if spec.startswith(RANDOM_INIT_FAMILIES) else model.get("weights")
    try:
        adapter = load_model(spec, None if weights in ("shipped", "factory", "embedded") else weights)
        infos = adapter.survey(reader.image_size)
        node = adapter.layer_info(layer, reader.image_size)
    except Exception:  # a model that does not load here: say nothing rather than guess
        return None
    found = nearest_non_negative(infos, node.name) if node else None
    if found is None or found.grid is None:
        return None
    name = adapter.display_names().get(found.name, found.name)
    h, w, d = found.grid
    return f"{name!r} (D={d}, {h}x{w})"


def _fit(reader: StoreReader, layer: str, ids: np.ndarray, k: int, negative: str,
         batch_images: int, epochs: int, tol: float, seed: int, progress: ProgressReporter) -> tuple[Any, Any, np.ndarray | None]:
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
        with progress.phase(f"{layer}: per-channel minimum", len(ids)) as phase:
            for batch in _batches(ids, batch_images):
                stats.update(_read_block(reader, layer, batch))
                phase.update(len(batch))
        assert stats.channel_min is not None  # ids is never empty (select_images)
        shift = nk.channel_shift(stats.channel_min)

    def epoch_blocks(epoch: int) -> Iterator[np.ndarray]:
        with progress.phase(f"{layer}: fitting k={k}, epoch {epoch + 1}/{epochs}", len(ids)) as phase:
            for batch in _batches(ids, batch_images, np.random.default_rng([seed, epoch])):
                block = _read_block(reader, layer, batch)
                if epoch == 0 and negative != "shift":
                    stats.update(block)
                yield nk.make_nonnegative(block, negative, shift=shift, layer=layer)
                phase.update(len(batch))

    fit = nk.fit_blocks(epoch_blocks, k, total_rows=len(ids) * geo.patches_per_image,
                        rows_per_block=batch_images * geo.patches_per_image, epochs=epochs,
                        tol=tol, seed=seed)
    return fit, stats, shift


def _transform_and_write(reader: StoreReader, out: GroupsWriter, layer: str, ids: np.ndarray,
                         model: Any, components: np.ndarray, negative: str, shift: np.ndarray | None,
                         batch_images: int, progress: ProgressReporter) -> dict[str, Any]:
    """Last pass: weights and groups of every selected image, written shard by shard."""
    from . import nmf_kernels as nk

    geo = reader.geometry(layer)
    k = components.shape[0]
    err_sq = norm_sq = 0.0
    sizes = np.zeros(k, dtype=np.int64)
    empty = 0
    phase = progress.phase(f"{layer}: writing groups", len(ids))
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
        out.write(lo, out_groups, out_weights)
        phase.update(len(sel))
    phase.close()
    return {"reconstruction_error": float(np.sqrt(err_sq / norm_sq)) if norm_sq > 0 else 0.0,
            "group_sizes": [int(s) for s in sizes], "patches_without_group": empty}


# ---------------------------------------------------------------------------------------- CLI
def summary_line(s: dict[str, Any]) -> str:
    """The one line ``hoverlay factorize`` prints on success."""
    return (f"factorised layer {s['layer']} of {s['store']}: k={s['k']} over "
            f"{s['images_factorized']} images ({s['images']}, {s['patches']} patches); negative="
            f"{s['negative']}, {100 * s['negative_mass_fraction']:.1f}% of activation mass negative"
            f"{' and clipped' if s['negative'] == 'clip' else ''}; relative reconstruction error "
            f"{s['reconstruction_error']:.3f}; group sizes {s['group_sizes']}; {s['epochs']} epochs, "
            f"{s['seconds']:.1f}s")
