"""The main grid's hover computed in the browser: what the server sends, and when.

Per page the server sends each shown layer's page vectors once (float16 bits as ``uint16``, norms
as float32: ``n·H·W·(2·D + 4)`` bytes per layer) and, when it changes, the query's vector per
layer (the pinned query, or where the pointer last rested). The browser (:data:`GRID_HOVER_JS`)
computes every shown layer's map on each pointer move and only tells the server where the
pointer rests (layer view, top-k) or was clicked (pin). A page whose vectors exceed the byte
budget keeps the server path: every patch change is a message and the server draws the maps.

A page switch arrives in two messages: first its images, captions and config (the page is
shown), then its vectors (the page becomes hoverable); a page's vectors are up to 4× its images'
bytes, and the browser receives them at tens of MB/s. Both carry the page's number (``page`` in
the config and in every vectors source), and the browser computes a layer's maps only from
vectors of the page the config names: between the two messages the overlays are empty, never the
last page's maps.

Paging on, the next page's vectors go ahead: in a session that has switched pages, once the
next page was read ahead (:mod:`explorer.prefetch`) its vectors are sent into the other of two
slots per layer, and a switch to it only names that slot and the page's number (a few bytes): the
page is hoverable as soon as it is shown. Only when two pages' vectors fit the byte budget
together (the browser then holds both).

Sources (names are what browser tests and benchmarks read):

- ``grid-hover``: the hovered patch's outline in every figure, written by the browser, never
  synced (``syncable=False``);
- ``grid-query``: ``fig``, ``q`` (float32 unit vector), ``qn`` (norm), ``pinned`` per layer;
- ``grid-vectors:<layer>`` and ``grid-vectors-1:<layer>``, two slots: ``v`` (uint16 bits of the
  page's float16 unit vectors, flat; the non-zero ones only where ``mask``, a bitmask of the
  non-zero values, is not empty: :mod:`explorer.sparse_fp16`), ``norm`` (float32, one per patch)
  and ``page`` (the page number they belong to; -1: a page sent ahead, not shown yet). The
  config's ``slot`` names the one the shown page's vectors are in;
- ``hover-link`` (never synced): what every browser-path view of a page shares, so that hovering
  one (the query tile of an upload) draws the others (the grid) in the same event, and the
  reverse. The hovered query's vectors ride on it as a JS property; a counter in its data wakes
  the views, one callback per view (a rebuilt view's callback replaces its predecessor's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import param
from bokeh.models import ColumnDataSource, CustomJS

from hoverlay.options import ByteSize

from . import sparse_fp16
from .figures import OUTLINE_COLUMNS, LayerFigure, SharedSources, empty_columns
from .js import GRID_HOVER_JS
from .kernels import SIMILARITY_FUNCTIONS, QueryVector
from .options import DEFAULT_BROWSER_HOVER_BUDGET
from .wasm_dot import dot_module_base64

#: Default byte budget of a page's vectors for the browser path (``--browser-hover-budget``).
DEFAULT_BUDGET = ByteSize().from_value(DEFAULT_BROWSER_HOVER_BUDGET)

#: Per-figure columns of the config source the browser path adds to :data:`figures.CONFIG_COLUMNS`.
HOVER_COLUMNS = ("D", "gy", "gx", "band", "mode", "fn", "sigma", "rest", "page", "slot")


def page_vector_bytes(n_images: int, geometries: Mapping[str, tuple[int, int, int]]) -> int:
    """Bytes the browser path sends for a page at most: float16 vectors and float32 norms of every
    layer (fewer where zeros are left out: :mod:`explorer.sparse_fp16`)."""
    return sum(n_images * h * w * (2 * d + 4) for h, w, d in geometries.values())


@dataclass(frozen=True)
class HoverPath:
    """Which path a page's hover takes, and why (shown on the page)."""

    browser: bool
    page_bytes: int
    budget: int
    sent_bytes: int | None = None  # what the page's vectors took once sent (zeros left out)

    def describe(self) -> str:
        size = _megabytes(self.page_bytes)
        if self.browser:
            if self.sent_bytes is not None and self.sent_bytes < self.page_bytes:
                return (f"hover maps computed in this browser ({_megabytes(self.sent_bytes)} of page vectors; "
                        f"{size} with their zeros)")
            return f"hover maps computed in this browser ({size} of page vectors)"
        if self.budget <= 0:
            return "hover maps computed by the server (browser path switched off)"
        return (f"hover maps computed by the server: this page's vectors ({size}) exceed the "
                f"browser budget of {_megabytes(self.budget)}")


def choose_path(n_images: int, geometries: Mapping[str, tuple[int, int, int]], budget: int) -> HoverPath:
    """Browser path when the page's vectors fit the budget (0 or less: always the server)."""
    nbytes = page_vector_bytes(n_images, geometries)
    return HoverPath(budget > 0 and nbytes <= budget, nbytes, budget)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


class HoverLink(param.Parameterized):
    """What a session's hoverable views share (the app makes one and hands it to each).

    ``source``: the browser's hovered query, passed from the view under the pointer to the others
    with no server in between; ``browser``: the path the main grid takes on its current page, which
    the other views follow (on the server path every patch change must reach the server, since
    the server draws the grid's maps).
    """

    browser = param.Boolean(default=False, doc="The main grid's page is on the browser path.")

    def __init__(self, **params: object):
        super().__init__(**params)
        self.source = ColumnDataSource({"n": [0]}, name="hover-link", syncable=False)
        self._callbacks: dict[str, CustomJS] = {}

    def attach(self, key: str, callback: CustomJS) -> None:
        """Wake ``callback`` when another view hovers; it replaces the one ``key`` had (a rebuilt
        grid's figures are new models: the old callback would paint the figures it replaced)."""
        old = self._callbacks.get(key)
        callbacks = [cb for cb in self.source.js_property_callbacks.get("change:data", []) if cb is not old]
        self.source.js_property_callbacks = {**self.source.js_property_callbacks,
                                             "change:data": [*callbacks, callback]}
        self._callbacks[key] = callback


class BrowserHover:
    """The browser path's sources and callbacks on one grid of layer figures (built with them)."""

    def __init__(self, figures: Sequence[LayerFigure], shared: SharedSources, prefix: str = "grid",
                 link: HoverLink | None = None):
        self.figures = list(figures)
        self.shared = shared
        self.link = link if link is not None else HoverLink()
        self.hover = shared.source(empty_columns(OUTLINE_COLUMNS), name=f"{prefix}-hover", syncable=False)
        self.query = shared.source(self._query_columns(), name=f"{prefix}-query")
        #: two slots of page vectors per layer: the shown page's (:attr:`slot`) and one sent ahead
        self.slots = [{fig.layer: shared.source({"v": [np.zeros(0, np.uint16)], "mask": [np.zeros(0, np.uint8)],
                                                 "norm": [np.zeros(0, np.float32)], "page": [0]},
                                                name=f"{prefix}-vectors{suffix}:{fig.layer}")
                       for fig in self.figures} for suffix in ("", "-1")]
        #: the slot the shown page's vectors are in (the config tells the browser)
        self.slot = 0
        self._page: np.ndarray | None = None
        self._ahead: np.ndarray | None = None  # the images whose vectors the other slot holds
        self._ahead_bytes = 0
        #: the number of the page last announced: the config carries it, and so will its vectors
        self.page_number = 0
        #: bytes of the vectors last delivered
        self.sent_bytes = 0
        args = {"cfg": shared.config, "ptr": shared.pointer, "hov": self.hover, "qsrc": self.query,
                "vecs0": [self.slots[0][f.layer] for f in self.figures],
                "vecs1": [self.slots[1][f.layer] for f in self.figures], "ovs": [f.source for f in self.figures],
                "link": self.link.source, "key": prefix, "wasm": dot_module_base64()}
        for i, fig in enumerate(self.figures):
            fig.source.syncable = False  # the browser writes the mosaic in place; nothing to send back
            fig.add_outline(self.hover, "#ffffff")
            cb = CustomJS(args={**args, "me": i}, code=GRID_HOVER_JS)
            for event in ("mousemove", "tap", "mouseleave"):
                fig.plot.js_on_event(event, cb)
        refresh = CustomJS(args={**args, "me": -1}, code=GRID_HOVER_JS)
        for src in (shared.config, self.query, *self.slots[0].values(), *self.slots[1].values()):
            src.js_on_change("data", refresh)
        self.link.attach(prefix, CustomJS(args={**args, "me": -2}, code=GRID_HOVER_JS))

    @staticmethod
    def _query_columns() -> dict[str, list]:
        return {"fig": [], "q": [], "qn": [], "pinned": []}

    @property
    def vectors(self) -> dict[str, ColumnDataSource]:
        """The shown page's vectors source per layer (the current slot)."""
        return self.slots[self.slot]

    def announce(self, ids: np.ndarray | None) -> bool:
        """A page is about to be shown (None: the server path): True when its vectors must be
        delivered — another page than the last one announced, under a new :attr:`page_number`,
        that was not sent ahead. A page sent ahead becomes the shown one here: its slot is the
        current one and gets the page's number (the only bytes the switch sends for them)."""
        ids = np.empty(0, np.int64) if ids is None else np.asarray(ids)
        if self._page is not None and np.array_equal(ids, self._page):
            return False
        self._page = ids.copy()
        self.page_number += 1
        if ids.size and self._ahead is not None and np.array_equal(ids, self._ahead):
            self.slot, self._ahead = 1 - self.slot, None
            for src in self.vectors.values():
                src.data.update(page=[self.page_number])  # only this column travels
            self.sent_bytes = self._ahead_bytes
            return False
        return True

    def deliver_ahead(self, ids: np.ndarray, vectors: Mapping[str, sparse_fp16.PackedLayer]) -> bool:
        """Send the vectors of page ``ids`` (the next one, packed) into the slot not shown, for a
        switch to find them there; False, sending nothing, for the shown page or for vectors of
        other layers than the figures'."""
        ids = np.asarray(ids)
        if not ids.size or (self._page is not None and np.array_equal(ids, self._page)) \
                or set(vectors) != set(self.vectors):
            return False
        if self._ahead is not None and np.array_equal(ids, self._ahead):
            return True  # there already
        other = self.slots[1 - self.slot]
        self._ahead_bytes = 0
        for layer, src in other.items():
            packed = vectors[layer]
            src.data = {"v": [packed.bits], "mask": [packed.mask], "norm": [packed.norms], "page": [-1]}
            self._ahead_bytes += packed.nbytes
        self._ahead = ids.copy()
        return True

    def deliver(self, number: int, vectors: Mapping[str, sparse_fp16.PackedLayer] | None) -> bool:
        """Send page ``number``'s vectors, packed (:class:`~explorer.sparse_fp16.PackedLayer`); None
        or an empty page: none, the server path. False, sending nothing, when another page was
        announced since (its own vectors follow)."""
        if number != self.page_number:
            return False
        n = 0 if self._page is None else len(self._page)
        self.sent_bytes = 0
        for layer, src in self.vectors.items():
            packed = sparse_fp16.PackedLayer.empty() if vectors is None or not n else vectors[layer]
            src.data = {"v": [packed.bits], "mask": [packed.mask], "norm": [packed.norms], "page": [number]}
            self.sent_bytes += packed.nbytes
        return True

    def ahead_fits(self, path: HoverPath) -> bool:
        """Whether a page may be sent ahead: the browser path, with two pages within the budget."""
        return path.browser and 2 * path.page_bytes <= path.budget

    def set_query(self, queries: Mapping[str, QueryVector] | None, pinned: bool) -> None:
        """The query the browser draws when pinned, or after a page change (None: no query yet)."""
        cols = self._query_columns()
        for layer, qv in (queries or {}).items():
            cols["fig"].append(layer)
            cols["q"].append(np.ascontiguousarray(qv.unit, dtype=np.float32))
            cols["qn"].append(float(qv.norm))
            cols["pinned"].append(int(pinned))
        self.query.data = cols

    @staticmethod
    def config_columns(path: HoverPath, layers: Sequence[str], dims: Mapping[str, int],
                       gaps: Mapping[str, tuple[int, int, int]], function: str,
                       sigmas: Mapping[str, float], rest_ms: int, page: int, slot: int = 0) -> dict[str, list]:
        """The hover columns of the config source, one row per figure (in ``layers`` order);
        ``page``: the page number the browser may compute maps from (:meth:`announce`), ``slot``:
        the vectors slot that page is in."""
        if function not in SIMILARITY_FUNCTIONS:
            raise ValueError(f"unknown similarity function {function!r}")
        return {
            "D": [int(dims[name]) for name in layers],
            "gy": [int(gaps[name][0]) for name in layers],
            "gx": [int(gaps[name][1]) for name in layers],
            "band": [int(gaps[name][2]) for name in layers],
            "mode": [int(path.browser)] * len(layers),
            "fn": [function] * len(layers),
            "sigma": [float(sigmas.get(name, 1.0)) for name in layers],
            "rest": [int(rest_ms)] * len(layers),
            "page": [int(page)] * len(layers),
            "slot": [int(slot)] * len(layers),
        }
