"""The top-k panel: the settled query's nearest patches in the whole store, as cards.

It follows :attr:`ExplorerState.settled` (when ``live_topk``) and ``search_now`` (the button,
a new ``k``). A search runs in a worker thread, at most one in flight per session; a request
meanwhile runs when it ends, and a result for a query or store the session has left is never
shown. A failed search is a message; hovering goes on.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from html import escape
from typing import Any

import panel as pn
import param

from hoverlay.stores import StoreReader

from .engine import Query
from .kernels import QueryVector
from .resources import get_search
from .session import Scheduler
from .state import ExplorerState
from .text import client_message
from .topk import card_data, crop_jpeg, search_hits
from .topk_view import TopKCards

log = logging.getLogger(__name__)

# (store, query, cards, index warning, how the hits were found)
TopKResult = tuple[str, Query, list[dict[str, Any]], "str | None", str]
HINT = "<b>Top-k</b>: hover a patch"


def _executor() -> ThreadPoolExecutor:
    return pn.state.as_cached("hoverlay-executor", ThreadPoolExecutor, max_workers=2,
                              thread_name_prefix="hoverlay-topk")


def compute_topk(store: str, reader: StoreReader, query: Query, qv: QueryVector, k: int) -> TopKResult:
    """Runs in a worker thread: search, then crops (only the shared reader and index)."""
    search = get_search(store, query.layer)
    hits, how = search_hits(search, qv, k)
    cards = [card_data(h, crop_jpeg(reader, query.layer, h)) for h in hits]
    return store, query, cards, search.warning, how


class TopKPanel(pn.viewable.Viewer):
    """Heading and cards of the dataset-wide nearest patches of the settled query."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")
    source = param.Selector(default="settled", objects=["settled", "second"], constant=True, doc="""
        Which query it searches: the settled one (A, or the pointer's), or the second pinned query B.""")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._doc = pn.state.curdoc
        self._scheduler = Scheduler(self._doc)
        self._busy = False
        self._pending = False
        self._searched: tuple[Query, int, str] | None = None
        # HTML, every value escaped: a Markdown pane rendered its text anew on every rest (~4%
        # of a loaded server's GIL time, for two headings)
        self.head = pn.pane.HTML(HINT, margin=(10, 10, 0, 10))  # as the query view's: clear of its colour bars
        self.cards = TopKCards(on_open=self.state.open_image, sizing_mode="stretch_width")
        self._layout = pn.Column(self.head, self.cards.download, self.cards, margin=0, sizing_mode="stretch_width",
                                 visible=self.source == "settled")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def _query(self) -> Query | None:
        state = self.state
        if self.source == "second":
            return state.second
        return state.settled if state.settled is not None else state.current

    @param.depends("state.settled", watch=True)
    def _on_settled(self) -> None:
        if self.source != "settled":
            return
        if self.state.settled is None:
            self._searched = None
            return
        if self.state.live_topk or self.state.pinned:
            self.request()

    @param.depends("state.second", watch=True)
    def _on_second(self) -> None:
        if self.source != "second":
            return
        self._layout.visible = self.state.second is not None
        if self.state.second is None:
            self._searched = None
            return
        self.request()

    @param.depends("state.search_now", watch=True)
    def _on_search_now(self) -> None:
        self.request(force=True)

    @param.depends("state.captions", watch=True)
    def _on_captions(self) -> None:
        self.cards.set_extra(self.state.card_extra)

    def request(self, force: bool = False) -> None:
        """Search for the settled query (skipped when these hits are shown, unless ``force``)."""
        state = self.state
        query = self._query()
        if query is None:
            return
        key = (query, state.k, str(state.store))
        if key == self._searched and not force:
            return
        if self._busy:
            self._pending = True
            return
        self._searched = key
        self._busy = True
        qv = state.query_vector(query)  # the state's engine stays on this thread
        # The store and reader are bound now: a store switch while this runs must not pair the
        # old query vector with the new store's index.
        self._scheduler.in_thread(_executor(), compute_topk, str(state.store), state.reader, query, qv, state.k,
                                  done=self._finish)

    def _finish(self, result: TopKResult | None, error: BaseException | None) -> None:
        self._busy = False
        if error is not None:  # a failed search must not break hovering
            log.error("top-k search failed", exc_info=error)
            self.state.say(f"top-k search failed: {client_message(error)}")
        pending, self._pending = self._pending, False
        if result is not None and result[0] != str(self.state.store):
            result, pending = None, True  # hits of a store this session has left: never shown
        if pending and (result is None or result[1] != self._query()):
            self.request()  # the pointer (or the store) moved on: search where it is now
            return
        if result is not None:
            self._show(result)

    def _show(self, result: TopKResult) -> None:
        _, query, cards, warning, how = result
        who = escape(self.state.image_name(query.image)) if self.state.is_upload(query.image) \
            else f"#{query.image}"
        role = "Query B — " if self.source == "second" else ""
        head = (f"{role}<b>Top {len(cards)}</b> patches of the store closest to {who} "
                f"({query.y},{query.x}) in <code>{escape(query.layer)}</code> — cosine, {escape(how)}")
        if warning:
            head += f"<br>⚠ {escape(warning)}"
        with pn.io.hold(self._doc):  # heading and cards in one message
            self.head.object = head
            self.cards.show([{**c, "extra": self.state.card_extra(int(c["image"]))}
                             for c in cards])
