"""Query with any image: an upload (drag and drop, or a file picker) or an allow-listed server path.

The image is embedded by the process's model worker (:mod:`explorer.query_worker`: this process
never imports torch) with the store's own model, preprocessing and layers, then shown as the
*query tile*, one figure per shown layer. Hovering it sets the query of every tile of the page.
On the browser path (the grid's page is on it) the tile holds the upload's vectors, so the
browser draws the tile's and the page's maps on every move with no message (the two views share
a :class:`~explorer.browser_hover.HoverLink`), and the server only hears where the pointer
rested; on the server path every patch change goes to the server, which draws them. A rest
brings the query-patch view and the top-k of the whole store, as for a store image. Nothing is written to
the store. A bad file, a store whose model cannot be loaded here, a busy or slow worker: a
message, and the rest of the page keeps working.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource

from hoverlay.stores.query_wire import EmbeddedImage
from hoverlay.stores.uploads import UploadError, read_upload, resolve_allowed_path

from .browser_hover import BrowserHover, HoverLink, HoverPath
from .engine import OverlayEngine, Query
from .figures import (
    MIN_TILE_PX,
    OUTLINE_COLUMNS,
    LayerFigure,
    SharedSources,
    empty_columns,
    grid_specs,
    outline_rows,
    palette,
    restyle,
)
from .query_worker import QueryWorkerError, shared_worker, shared_worker_config
from .resources import cached, storage_options_of
from .session import Scheduler, pointer_cell
from .sparse_fp16 import PackedLayer
from .state import ExplorerState
from .text import as_plain_markdown, client_message
from .widgets import button, labelled

log = logging.getLogger(__name__)

HINT = ("**Query with your own image**: choose an image file (or drop one on the button); it is "
        "embedded with this store's model and nothing is stored")


def _reader() -> ThreadPoolExecutor:
    """Where an allow-listed server file is read and checked (never on the event loop)."""
    return cached("hoverlay-upload-read", lambda: ThreadPoolExecutor(max_workers=1,
                                                                      thread_name_prefix="hoverlay-upload"))


class UploadView(pn.viewable.Viewer):
    """The drop zone, the optional server-path input, and the uploaded image as a hoverable tile."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")
    link = param.ClassSelector(class_=HoverLink, doc="Shared with the grid: its path, the browser's hover.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.link is None:
            self.link = HoverLink()
        self.link.param.watch(lambda e: self._refresh(), "browser")
        self._doc = pn.state.curdoc
        self._scheduler = Scheduler(self._doc)
        self._rest: Any = None
        self._last_click = 0
        self._busy = False
        self.figures: list[LayerFigure] = []
        self._built_for: tuple[Any, ...] | None = None
        self._uid = 0
        # Bokeh's own file input (a file picker that also takes a dropped file), not Panel's
        # FileDropper: that needs pn.extension('filedropper'), which `panel serve` scripts and
        # notebooks calling plain pn.extension() do not load (the page then never rendered)
        self.dropper = pn.widgets.FileInput(accept="image/*", multiple=False, width=300, margin=(4, 10),
                                            css_classes=["hoverlay-upload-input"])
        self.dropper.param.watch(self._on_drop, "value")
        self.status = pn.pane.Markdown(HINT, margin=(4, 10), css_classes=["hoverlay-upload-status"],
                                       sizing_mode="stretch_width")
        inputs: list[Any] = [self.dropper]
        if self.state.query_folders:
            self.path_input = pn.widgets.TextInput(**labelled(pn.widgets.TextInput, "Image on the server"),
                                                   placeholder="path inside the allowed folders", width=240)
            open_b = button("Query", width=70)
            open_b.on_click(lambda e: self.open_path(self.path_input.value))
            inputs.append(pn.Row(self.path_input, pn.Column(open_b, margin=(18, 0, 0, 0))))
        self.mapped_source = ColumnDataSource(empty_columns(OUTLINE_COLUMNS), name="upload-mapped")
        self._image = 0  # the upload the tile shows
        self._row = pn.Row(styles={"flex-wrap": "wrap", "gap": "4px 12px"}, visible=False)
        self._layout = pn.Column(self.status, pn.Row(*inputs, self._row, styles={"flex-wrap": "wrap"}),
                                 margin=(0, 0, 8, 0), sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    # ================================================================== getting an image
    def _on_drop(self, event: param.parameterized.Event) -> None:
        data = event.new
        if not isinstance(data, (bytes, bytearray)):  # cleared, or more than one file
            return
        self.submit(bytes(data), str(self.dropper.filename or "the upload"))

    def open_path(self, text: str) -> None:
        """Query with an image of an allow-listed server folder (never an arbitrary path)."""
        try:
            path = resolve_allowed_path(str(text or ""), self.state.query_folders)
        except UploadError as exc:
            self._say(exc.public)
            return
        cfg = shared_worker_config()

        def read() -> bytes:  # reads and checks the file (a decode): off the loop
            return read_upload(path, name=str(text), max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels)[0]

        def read_done(data: bytes | None, error: BaseException | None) -> None:
            if error is not None:
                self._say(error.public if isinstance(error, UploadError) else client_message(error))
            elif data is not None:
                self.submit(data, str(text), validated=True)

        self._scheduler.in_thread(_reader(), read, done=read_done)

    def submit(self, data: bytes, name: str, validated: bool = False) -> None:
        """Embed in the worker, show when done. The event loop never waits: the worker client
        validates the file on its own thread (a 60-megapixel photo takes a second to decode) and
        a bad one fails the future with its message; ``validated``: checked already (a server file)."""
        if self._busy:
            self._say("an image is being embedded already: wait for it")
            return
        self._busy = True
        store = str(self.state.store)
        self.status.object = f"embedding {as_plain_markdown(name)} with this store's model…"
        future: Future[EmbeddedImage] = shared_worker().submit(data, store, None, name=name, validate=not validated,
                                                                storage_options=storage_options_of(store))
        self._scheduler.when_done(future, lambda r, e: self._embedded(store, name, r, e))

    def _embedded(self, store: str, name: str, result: EmbeddedImage | None, error: BaseException | None) -> None:
        self._busy = False
        if error is not None:
            text = error.public if isinstance(error, (QueryWorkerError, UploadError)) else client_message(error)
            log.warning("query image %r failed: %s", name, error)
            self._say(text)
            return
        assert result is not None
        if store != str(self.state.store):
            self._say("the store changed while the image was embedded: upload it again")
            return
        layers = {k: (v.vectors, v.norms) for k, v in result.layers.items()}
        self._uid = self.state.add_upload(name, result.pixels, layers)
        self.status.object = (f"**Query image** {as_plain_markdown(name)}: hover it to query every image "
                              f"of the page; click to pin")
        self._show()

    def _say(self, text: str) -> None:
        self.status.object = f"⚠ {as_plain_markdown(text)}"

    # ===================================================================== the query tile
    @param.depends("state.view", "state.settled", "state.current", watch=True)
    def _refresh(self) -> None:
        view = self.state.view
        if view is None or not self._uid:
            return
        if not self.state.is_upload(self._uid):  # another store: its model would embed it anew
            self._uid, self.figures, self._built_for = 0, [], None
            self._row.objects, self._row.visible = [], False
            self.status.object = HINT
            return
        self._show()

    def _build(self) -> None:
        state, view = self.state, self.state.view
        assert view is not None
        hws = {name: state.hw(name) for name in view.layers}
        self.specs = grid_specs(hws, 1, 1, state.reader.image_size, max(view.tile_px, MIN_TILE_PX))
        self.shared = SharedSources.create("upload")
        self.shared.pointer.on_change("data", self._on_pointer)
        pal = palette(state.cmap)
        self.figures = [LayerFigure(name, self.specs[name], self.shared, index=i, palette=pal,
                                    clim=state.clim(name), alpha=state.alpha, title=name, prefix="upload",
                                    outline_source=self.mapped_source, hover=False)
                        for i, name in enumerate(view.layers)]
        self.browser = BrowserHover(self.figures, self.shared, prefix="upload", link=self.link)
        self.engine = OverlayEngine(state.reader, list(view.layers), external=state.external)
        self._row.objects = [pn.pane.Bokeh(f.plot) for f in self.figures]
        self._built_for = (view.grid, view.active_layer, state.reader)
        self._image = 0

    def _show(self) -> None:
        """The upload's tile and its similarity to the query shown (its own patch, or a store's)."""
        state, view = self.state, self.state.view
        assert view is not None
        with pn.io.hold(self._doc):
            if (view.grid, view.active_layer, state.reader) != self._built_for:
                self._build()
            if self._image != self._uid:
                self.shared.set_images(self.specs, state.image_pixels(self._uid), [""])
                self._image = self._uid
            self._send_hover()
            q, layers = state.current, list(view.layers)
            browser = self.link.browser
            if browser:  # the browser draws the tile: it needs the query only when it cannot know it
                self.browser.set_query(self.engine.query_vectors(q, layers) if q is not None else None,
                                       pinned=state.pinned)
            maps = self.engine.image_maps(self._uid, q, view.function, state.sigmas(layers)) \
                if q is not None and not browser else {}
            for fig in self.figures:
                fig.set_colors(clim=state.clim(fig.layer))
                fig.colorbar.title = view.function
                if not browser:
                    fig.set_maps(maps.get(fig.layer), 1)
            on_tile = q is not None and q.image == self._uid
            self.mapped_source.data = outline_rows((fig, 0, *state.mapped(q, fig.layer)) for fig in self.figures
                                                   if on_tile and q is not None)
            self._row.visible = True

    def _send_hover(self) -> None:
        """The tile's config for the pointer (and, on the browser path, the function, sigmas and
        rest delay) and, on the browser path, the upload's vectors (once per upload)."""
        state, view = self.state, self.state.view
        assert view is not None
        layers = list(self.specs)
        path = HoverPath(self.link.browser, 0, state.browser_hover_budget)
        new = self.browser.announce(np.array([self._uid], dtype=np.int64) if path.browser else None)
        extra = BrowserHover.config_columns(
            path, layers, {n: state.reader.geometry(n).dim for n in layers},
            {n: (*self.specs[n].gap_cells, self.specs[n].band_cells) for n in layers},
            view.function, state.sigmas(layers), state.topk_delay_ms, self.browser.page_number)
        self.shared.set_config(self.specs, view.active_layer, 1, extra)
        if new:  # one tile: its vectors (converted once per upload) go in the same message
            vectors = None
            if path.browser:
                blocks = state.external[self._uid]
                vectors = {}
                for name in layers:
                    n, h, w = blocks[name].shape
                    vectors[name] = PackedLayer.of(blocks[name].vectors.reshape(n, h, w, -1).astype(np.float16),
                                                   blocks[name].norms.reshape(n, h, w))
            self.browser.deliver(self.browser.page_number, vectors)

    @param.depends("state.cmap", "state.alpha", watch=True)
    def _on_colors(self) -> None:
        with pn.io.hold(self._doc):
            restyle(self.figures, palette(self.state.cmap), self.state.alpha)

    def _on_pointer(self, attr: str, old: Any, new: dict[str, list]) -> None:
        """The pointer on the query tile: a patch of the snapping layer, or a click (pin / unpin).
        The row is client input: anything but tile 0 and a cell of the grid is dropped."""
        view = self.state.view
        if view is None or not self.state.is_upload(self._uid):
            return
        cell = pointer_cell(new, 1, self.state.hw(view.active_layer))  # the grid's own check of client rows
        if cell is None:
            return
        _, y, x, click = cell
        query = Query(self._uid, y, x, view.active_layer)
        if click != self._last_click:
            self._last_click = click
            self.state.click(query)
            return
        if self.state.query:
            return
        self.state.hover(query)
        self._scheduler.cancel(self._rest)
        # the browser path's message is already a rest; the server path waits for one
        self._rest = self._scheduler.later(self.state.rest, 0 if self.link.browser else self.state.topk_delay_ms)

    def image_maps(self) -> dict[str, np.ndarray]:
        """The query tile's maps for the current query (tests read what the figures hold)."""
        q = self.state.current
        view = self.state.view
        if q is None or view is None or not self._uid:
            return {}
        return self.engine.image_maps(self._uid, q, view.function, self.state.sigmas(list(view.layers)))
