"""The explorer app: it only composes the session's state and its views.

One :class:`~explorer.state.ExplorerState` per browser session holds and validates everything
shown; each view is a ``pn.viewable.Viewer`` holding that state and reacting to it:

- :class:`~explorer.controls.Controls`: the sidebar and the message box;
- :class:`~explorer.grid_view.GridView`: the page of tiles per shown layer, overlays, paging, export
  (and its :class:`~explorer.groups_view.GroupsOverlay`);
- :class:`~explorer.query_view.QueryPatchView`: the settled query in every shown layer;
- :class:`~explorer.topk_panel.TopKPanel`: the dataset-wide nearest patches;
- :class:`~explorer.upload_view.UploadView`: a query with any image (upload or allow-listed path);
- :class:`~explorer.pair_view.QueryPairView` (and a second :class:`~explorer.topk_panel.TopKPanel`):
  two pinned queries A and B side by side, their difference, both top-k lists;
- :class:`~explorer.sweep_view.SweepView` and :class:`~explorer.compare.CompareView`: the case
  study tabs, offered when the stores support them.

In a server session the whole view is mirrored in the URL (:class:`~explorer.url_state.UrlState`).
No module of the explorer imports this one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import panel as pn
import param

from .browser_hover import HoverLink
from .compare import CompareView, find_compare_pair
from .controls import Controls
from .grid_view import GridView
from .pair_view import QueryPairView
from .query_view import QueryPatchView
from .session import served
from .state import URL_PARAMETERS, ExplorerState
from .sweep_view import SweepView, has_sweeps
from .topk_panel import TopKPanel
from .upload_view import UploadView
from .url_state import UrlState

log = logging.getLogger(__name__)


class ExplorerApp(pn.viewable.Viewer):
    """One session's explorer: the state, its views, the tabs and the page layout."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")

    def __init__(self, stores: Sequence[str], url: dict[str, Any] | None = None, **options: Any):
        doc = pn.state.curdoc
        state = ExplorerState(stores, url=url, hold=lambda: pn.io.hold(doc), **options)
        super().__init__(state=state)
        self.controls = Controls(state=state)
        link = HoverLink()  # the grid and the query tile draw each other's hover in the browser
        self.grid = GridView(state=state, link=link)
        self.query_view = QueryPatchView(state=state)
        self.topk = TopKPanel(state=state)
        self.upload = UploadView(state=state, link=link)
        self.pair = QueryPairView(state=state)
        self.topk_b = TopKPanel(state=state, source="second")
        # The page's first document holds what is seen first: the sidebar, the message, the upload
        # row and the grid. The views below the grid (the pair view, hidden until a second pin, and
        # both top-k panels, empty until a query) join it once the browser has drawn it
        # (:meth:`on_load`), in their places: nothing above them moves. Measured on a 200-image v2
        # store (2 cores, two A/Bs): the grid drawn 70-90 ms sooner at open (of ~1.5 s), hoverable
        # 80-100 ms sooner. Deferring the sidebar too saved ~0.16 s more but it then appeared ~0.5 s after
        # the grid, later than it does now; the sidebar stays in the first document.
        self._views = [self.controls.message, self.upload, self.grid, self.pair, self.query_view, self.topk,
                       self.topk_b]
        self._later = (self.pair, self.topk, self.topk_b)
        self._complete = not served(pn.state.curdoc)
        main = pn.Column(*(v for v in self._views if self._complete or v not in self._later),
                         margin=(0, 0, 0, 16))
        self._main = main
        tabs = self._case_studies([str(u) for u in stores])
        if tabs:
            main.margin = (0, 0, 0, 0)
            self.tabs: pn.Tabs | None = pn.Tabs(("Explorer", main), *tabs, dynamic=False, margin=(0, 0, 0, 16))
            views = [None, *(v for v in (self.sweep_view, self.compare_view) if v is not None)]
            # a view builds its figures when its tab is first shown, not at session start
            self.tabs.param.watch(lambda e: views[e.new] and views[e.new].activate(), "active")
            self.tabs.param.watch(lambda e: setattr(state, "tab", e.new), "active")
            body: pn.viewable.Viewable = self.tabs
        else:
            self.tabs = None
            body = main
        self.layout = pn.Row(self.controls, body)
        state.param.watch(lambda e: self._show_tab(), ["tab"])
        state.start(n_tabs=1 + len(tabs))
        self._show_tab()

    def __panel__(self) -> pn.viewable.Viewable:
        return self.layout

    def _case_studies(self, urls: list[str]) -> list[tuple[str, pn.viewable.Viewable]]:
        """Tabs for the case studies the stores support: transform sweeps, comparing models."""
        state = self.state
        tabs: list[tuple[str, pn.viewable.Viewable]] = []
        self.sweep_view = SweepView(state=state) if has_sweeps(state) else None
        if self.sweep_view is not None:
            tabs.append(("Transform sweep", self.sweep_view.layout))
        self.compare_view = None
        if state.compare is not False and len(urls) > 1:
            pair = find_compare_pair(urls)
            if pair is not None:
                self.compare_view = CompareView(*pair, state=state)
                tabs.append(("Compare models", self.compare_view.layout))
            elif state.compare:
                names = ", ".join(state.store_keys[u] for u in urls)
                state.say(f"no two of the stores {names} share images (content hashes): nothing to compare")
        elif state.compare:
            state.say("comparing models needs two stores built from the same images")
        return tabs

    def _show_tab(self) -> None:
        """The tab the state names; the sidebar only on the Explorer tab, where its controls act."""
        if self.tabs is not None and self.tabs.active != self.state.tab:
            self.tabs.active = self.state.tab
        self.controls.sidebar.visible = self.state.tab == 0

    def complete_page(self) -> None:
        """The views below the grid join the page (once; see ``__init__``)."""
        if self._complete:
            return
        self._complete = True
        with pn.io.hold(pn.state.curdoc):
            self._main.objects = list(self._views)

    def on_load(self) -> None:
        """Once the browser is connected (a server session and a notebook cell alike)."""
        self.grid.on_load()  # first: a URL's pinned query is drawn before the views below join
        self.complete_page()
        self.query_view.prepare_later()


def create_app(stores: Sequence[str] | str, **options: Any) -> pn.viewable.Viewable:
    """Build one session's explorer as a servable Panel layout.

    ``stores`` is one store URL or a list (a selector appears for several). ``options`` set
    :class:`~explorer.state.ExplorerState` parameters (``layer``, ``page_size``, ``k``, ``cmap``,
    ...). In a server session the whole view is mirrored in the URL (:data:`URL_PARAMETERS`),
    and a URL's values override the options. The app is available as ``layout.app`` and its
    state as ``layout.app.state``.
    """
    urls = [stores] if isinstance(stores, str) else list(stores)
    doc = pn.state.curdoc
    location = pn.state.location if served(doc) else None
    if location is None:
        app = ExplorerApp(urls, **options)
    else:
        url_state = UrlState()
        location.sync(url_state, URL_PARAMETERS)  # the URL's values, untyped, into url_state
        app = ExplorerApp(urls, url=url_state.values(), **options)
        url_state.follow(app.state, location)
        pn.state.onload(url_state.publish)
    pn.state.onload(app.on_load)
    layout = app.layout
    layout.app = app  # type: ignore[attr-defined]
    return layout
