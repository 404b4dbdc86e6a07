"""The top-k panel as one browser component: all cards in one property change.

Building the panel from Panel layouts (a Column, an HTML pane and a Button per hit, each a
Bokeh model with its own stylesheets) took 0.15-0.3 s of the server's event loop per search,
during which every other session's hover waited. Here a search result is a list of small dicts sent as one
property; the browser draws the cards, and a click on a card's button comes back as one message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import param
from panel.custom import JSComponent

_ESM = """
function card(c, rank) {
  const item = document.createElement('div');
  item.className = 'topk-item';
  Object.assign(item.dataset, {rank: String(rank), image: String(c.image), y: String(c.y),
                               x: String(c.x), score: c.score.toFixed(6)});
  const img = document.createElement('img');
  img.src = c.src; img.width = 96; img.height = 96;
  img.alt = `image ${c.image} patch ${c.y},${c.x}`;
  const caption = document.createElement('div');
  const score = document.createElement('b');
  score.textContent = c.score.toFixed(3);
  caption.append(score, ` #${c.image} (${c.y},${c.x})`, document.createElement('br'), c.label);
  const open = document.createElement('button');
  open.type = 'button';
  open.className = 'topk-open';
  open.textContent = `open #${c.image}`;
  item.append(img, caption, open);
  return item;
}

export function render({ model, el }) {
  const box = document.createElement('div');
  box.className = 'topk-panel';
  const draw = () => box.replaceChildren(...model.cards.map(card));
  box.addEventListener('click', (ev) => {
    const button = ev.target.closest('button.topk-open');
    if (button) model.send_msg({open: Number(button.parentElement.dataset.image)});
  });
  draw();
  model.on('cards', draw);
  el.append(box);
}
"""

_CSS = """
.topk-panel { display: flex; flex-wrap: wrap; gap: 6px; }
.topk-item { width: 100px; font-size: 11px; line-height: 1.2; }
.topk-item img { display: block; image-rendering: pixelated; }
.topk-open { width: 96px; height: 24px; margin-top: 2px; font-size: 11px; cursor: pointer; }
"""


class TopKCards(JSComponent):
    """Cards of the current top-k hits; ``on_open(image)`` runs when a card's button is clicked."""

    cards = param.List(default=[], item_type=dict, doc="One dict per hit, best first (see card_data).")

    _esm = _ESM
    _stylesheets = [_CSS]

    def __init__(self, on_open: Callable[[int], None] | None = None, **params: Any):
        super().__init__(**params)
        self._on_open = on_open

    def show(self, cards: Sequence[dict[str, Any]]) -> None:
        self.cards = list(cards)

    def _handle_msg(self, data: Any) -> None:
        """A card's button was clicked: ``{"open": image id}`` (anything else is ignored)."""
        if not isinstance(data, dict) or self._on_open is None:
            return
        try:
            image = int(data.get("open"))  # from the client: never trusted to be well formed
        except (TypeError, ValueError):
            return
        self._on_open(image)
