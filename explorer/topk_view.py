"""The top-k panel as one browser component: all cards in one property change.

Building the panel from Panel layouts (a Column, an HTML pane and a Button per hit, each a
Bokeh model with its own stylesheets) took 0.15-0.3 s of the server's event loop per search,
during which every other session's hover waited. Here a search result is a list of small dicts
sent as one JSON string property; the browser draws the cards, and a click on a card's button
comes back as one message.

Beside the cards a download button serves the shown hits as CSV: the rows of
``hoverlay export hits`` (``stores.exports.hit_columns``: layer, image, source, label, y, x,
patch id, the full-precision cosine and the user's metadata columns) after a 1-based rank,
written by the same CSV writer (RFC 4180 quoting, and text cells that a spreadsheet would run
as a formula — starting with = + - @ — get a leading '). The rows stay on the server: the cards
the browser gets carry only what it draws.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import panel as pn
import param
from panel.custom import JSComponent

from hoverlay.stores.exports import csv_bytes

from .widgets import colored

_CSS = """
.topk-panel { display: flex; flex-wrap: wrap; gap: 6px; }
.topk-item { width: 100px; font-size: 11px; line-height: 1.2; }
.topk-item img { display: block; image-rendering: pixelated; }
.topk-open { width: 96px; height: 24px; margin-top: 2px; font-size: 11px; cursor: pointer; }
"""


class TopKCards(JSComponent):
    """Cards of the current top-k hits; ``on_open(image)`` runs when a card's button is clicked."""

    cards = param.List(default=[], item_type=dict, doc="One dict per hit, best first (see card_data).")
    payload = param.String(default="[]", doc="``cards`` as JSON: what the browser gets.")

    # The cards travel as one JSON string: as a list of dicts Panel walked every value for
    # models to reference (``_patch_datamodel_ref``), ~13% of a loaded server's GIL time a rest.
    _rename = {"cards": None}
    # A plain ES module in a file beside this one: a served page imports it by URL (cached, shared by
    # both panels); an inline ``_esm`` is compiled in the browser by sucrase once per component.
    _bundle = "topk_cards.js"
    _esm = "topk_cards.js"
    _stylesheets = [_CSS]

    #: the file name the download button offers
    csv_name = "hoverlay-topk.csv"

    def __init__(self, on_open: Callable[[int], None] | None = None, **params: Any):
        super().__init__(**params)
        self._on_open = on_open
        self._rows: list[dict[str, Any]] = []
        # Not a Child of this component: a child's view is drawn by the module's render, and a
        # search ending before the module ran (a loaded machine) toggled ``disabled`` on a view
        # with no element: the browser threw while applying the message, dropping its later changes
        self.download = pn.widgets.FileDownload(
            callback=self.csv_file, filename=self.csv_name, label="Download top-k CSV", disabled=True,
            embed=False, width=170, margin=(0, 0, 6, 0), **colored(pn.widgets.FileDownload, "default"))

    def show(self, cards: Sequence[dict[str, Any]]) -> None:
        """Draw these cards; their ``row`` (the exported row, see ``card_data``) stays here."""
        self._rows = [dict(c.get("row") or {k: c[k] for k in ("image", "y", "x", "score", "label") if k in c})
                      for c in cards]
        self._set_cards([{k: v for k, v in c.items() if k != "row"} for c in cards])
        self.download.disabled = not self._rows

    def _set_cards(self, cards: list[dict[str, Any]]) -> None:
        self.cards = cards
        self.payload = json.dumps(cards, separators=(",", ":"))

    def set_extra(self, extra: Callable[[int], list[str]]) -> None:
        """New extra caption lines (chosen metadata columns) for the cards shown, by image id."""
        self._set_cards([{**c, "extra": extra(int(c["image"]))} for c in self.cards])

    def csv_columns(self) -> dict[str, list[Any]]:
        """The shown hits as columns: ``rank`` (1 = best) and each row's fields."""
        names = list(dict.fromkeys(k for row in self._rows for k in row))
        columns: dict[str, list[Any]] = {"rank": list(range(1, len(self._rows) + 1))}
        columns |= {n: [row.get(n) for row in self._rows] for n in names if n != "rank"}
        return columns

    def csv_file(self) -> io.BytesIO:
        """What the download button serves: the shown hits as CSV (UTF-8)."""
        return io.BytesIO(csv_bytes(self.csv_columns()))

    def _handle_msg(self, data: Any) -> None:
        """A card's button was clicked: ``{"open": image id}`` (anything else is ignored)."""
        if not isinstance(data, dict) or self._on_open is None:
            return
        try:
            image = int(data.get("open"))  # from the client: never trusted to be well formed
        except (TypeError, ValueError):
            return
        self._on_open(image)
