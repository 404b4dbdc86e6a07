"""Per-process shared resources: store readers, layer searches and layer statistics.

Opening a store, memory-mapping a FAISS index or sampling a layer's norms costs far more than a
hover, so each is done once per server process and shared by every browser session through
:func:`cached` (which serialises the first construction of each entry under its own lock). The
cache is this module's, not Panel's: the session state (:mod:`explorer.state`) uses these
resources and imports neither Panel nor Bokeh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from hoverlay.options import ByteSize
from hoverlay.stores import StoreReader, open_store
from hoverlay.stores.search import LayerSearch

from .options import DEFAULT_READ_CACHE

log = logging.getLogger(__name__)

#: How many images :func:`layer_stats` reads to estimate a layer's norm distribution.
STATS_SAMPLE_IMAGES = 128
#: How many images it reads to decide whether a layer's vectors are non-negative.
SIGN_SAMPLE_IMAGES = 8


@dataclass(frozen=True)
class LayerStats:
    """What fixes a layer's colour ranges and RBF scale, estimated from a sample of images."""

    nonnegative: bool  # post-ReLU layers: cosine in [0, 1]
    norm_median: float  # default RBF sigma
    norm_hi: float  # 99th percentile norm: dot-product colour range is [0, norm_hi²]


def sample_ids(n_images: int, k: int) -> np.ndarray:
    """``k`` image ids spread evenly over the store (deterministic: every process agrees)."""
    if n_images <= 0:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_images - 1, num=min(k, n_images)).round().astype(np.int64))


def compute_layer_stats(reader: StoreReader, layer: str) -> LayerStats:
    """Estimate :class:`LayerStats` from a spread-out sample of committed images."""
    ids = sample_ids(reader.n_images, STATS_SAMPLE_IMAGES)
    norms = reader.norms(layer, ids).ravel() if ids.size else np.ones(1, np.float32)
    nonzero = norms[norms > 0]
    if nonzero.size == 0:
        nonzero = np.ones(1, np.float32)
    sign_ids = sample_ids(reader.n_images, SIGN_SAMPLE_IMAGES)
    nonneg = bool(sign_ids.size == 0 or float(reader.vectors(layer, sign_ids).min()) >= 0)
    return LayerStats(nonnegative=nonneg, norm_median=float(np.median(nonzero)),
                      norm_hi=float(np.percentile(nonzero, 99)))


T = TypeVar("T")
_CACHE: dict[tuple[Hashable, ...], Any] = {}
_KEY_LOCKS: dict[tuple[Hashable, ...], threading.Lock] = {}
_LOCK = threading.Lock()


def cached(name: str, make: Callable[..., T], **key: Hashable) -> T:
    """The process-wide ``make(**key)``, built once per (name, key) even when sessions ask at once."""
    k = (name, *sorted(key.items()))
    try:
        return _CACHE[k]
    except KeyError:
        pass
    with _LOCK:
        lock = _KEY_LOCKS.setdefault(k, threading.Lock())
    with lock:
        if k not in _CACHE:
            _CACHE[k] = make(**key)
        return _CACHE[k]


def evict(name: str, **match: Hashable) -> int:
    """Forget the cached entries of ``name`` whose key includes ``match``; returns how many."""
    want = set(match.items())
    with _LOCK:
        stale = [k for k in _CACHE if k[0] == name and want <= set(k[1:])]
        for k in stale:
            _CACHE.pop(k, None)
            _KEY_LOCKS.pop(k, None)
    return len(stale)


#: fsspec options per store URL, set once by :func:`set_storage_options` before serving.
_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}
#: Bytes of decoded image rows each store's reader keeps for re-reads (``--read-cache``):
#: every pointer rest re-reads the images its session's page was just sent
_READ_CACHE = {"bytes": ByteSize().from_value(DEFAULT_READ_CACHE)}


def set_storage_options(url: str, options: dict[str, Any] | None) -> None:
    """Remember the fsspec options (credentials, endpoint) a remote store is opened with."""
    if options:
        _STORAGE_OPTIONS[str(url)] = dict(options)


def set_read_cache(nbytes: int) -> None:
    """Bytes of decoded rows per store reader (0: none), for readers opened after this call."""
    if nbytes < 0:
        raise ValueError(f"a read cache of {nbytes} bytes")
    _READ_CACHE["bytes"] = int(nbytes)


def storage_options_of(url: str) -> dict[str, Any] | None:
    """The fsspec options a store is opened with (for the model worker, which opens it too)."""
    opts = _STORAGE_OPTIONS.get(str(url))
    return dict(opts) if opts else None


def get_reader(url: str) -> StoreReader:
    """The process-wide reader of a store."""
    return cached("hoverlay-reader", _open_reader, url=str(url))


def _open_reader(url: str) -> StoreReader:
    return open_store(url, storage_options=_STORAGE_OPTIONS.get(url), row_cache_bytes=_READ_CACHE["bytes"])


#: Name of the cache entries :func:`get_search` creates (:func:`evict` them to reopen an index).
SEARCH_CACHE_KEY = "hoverlay-search"


def get_search(url: str, layer: str) -> LayerSearch:
    """The process-wide :class:`LayerSearch` of one layer (FAISS index memory-mapped once).

    Keyed by the committed image count too: after a new commit (see :func:`refresh_reader`) the
    next search re-checks whether the index still covers the store instead of using it stale.
    """
    n = get_reader(url).n_images
    return cached(SEARCH_CACHE_KEY, _make_search, url=str(url), layer=layer, n_images=n)


def refresh_reader(url: str) -> StoreReader:
    """The shared reader, after picking up a newer commit if one was published (a small JSON read)."""
    reader = get_reader(url)
    try:
        reader.refresh()
    except Exception:  # a store being rewritten right now: keep serving the last commit
        log.warning("could not refresh %s; serving its last commit", url, exc_info=True)
    return reader


def get_layer_stats(url: str, layer: str) -> LayerStats:
    """The process-wide :class:`LayerStats` of one layer."""
    return cached("hoverlay-stats", _make_stats, url=str(url), layer=layer)


def _make_search(url: str, layer: str, n_images: int) -> LayerSearch:
    return LayerSearch(get_reader(url), layer)


def _make_stats(url: str, layer: str) -> LayerStats:
    from .damage import TolerantReader

    return compute_layer_stats(TolerantReader(get_reader(url)), layer)  # type: ignore[arg-type]
