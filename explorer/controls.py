"""The explorer's sidebar and message box: widgets bound to :class:`explorer.state.ExplorerState`.

Every widget here either mirrors a state parameter (``from_param``) or calls one state method;
the few the state cannot link itself (plain-string inputs the state validates, the store by its
display name) follow the published view.
"""

from __future__ import annotations

from typing import Any

import panel as pn
import param

from .kernels import SIMILARITY_FUNCTIONS
from .state import ExplorerState
from .text import as_plain_markdown
from .widgets import button, labelled


class Controls(pn.viewable.Viewer):
    """The sidebar (layer, similarity, colours, query, images, top-k) and the message box."""

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        state = self.state
        w = pn.widgets
        wide = {"width": 260}
        self.layer_select = w.Select(**labelled(w.Select, "Layer (pointer snaps to)"), options=state.layer_names,
                                     value=state.active_layer, **wide)
        self.function_select = w.Select(**labelled(w.Select, "Similarity"), options=list(SIMILARITY_FUNCTIONS),
                                        value="cosine", **wide)
        # layer and function are plain strings (URL-mirrored, validated by the state), so link by hand
        self.layer_select.param.watch(lambda e: setattr(state, "layer", e.new), "value")
        self.function_select.param.watch(lambda e: setattr(state, "function", e.new), "value")
        qimage = w.IntInput(**labelled(w.IntInput, "image"), value=0, start=0, width=80)
        qy = w.IntInput(**labelled(w.IntInput, "y"), value=0, start=0, width=60)
        qx = w.IntInput(**labelled(w.IntInput, "x"), value=0, start=0, width=60)
        self.query_inputs = (qimage, qy, qx)
        self.pin_button = button("Pin query", "primary", width=110)
        self.pin_button.on_click(lambda e: state.pin(qimage.value or 0, qy.value or 0, qx.value or 0))
        unpin_b = button("Unpin", width=80)
        unpin_b.on_click(lambda e: state.unpin())
        pin_second = button("Pin as B", width=90)
        pin_second.on_click(lambda e: state.pin_b())
        clear_second = button("Clear B", width=80)
        clear_second.on_click(lambda e: state.unpin_b())
        sample_b = button("Random sample", width=120)
        sample_b.on_click(lambda e: state.random_sample())
        similar_b = button("Most similar to query", width=170)
        similar_b.on_click(lambda e: state.sort_by_similarity())
        topk_b = button("Search top-k now", width=140)
        topk_b.on_click(lambda e: state.param.trigger("search_now"))
        stores = []
        if len(state.store_keys) > 1:  # by display name: the browser never sees a server path
            self.store_select = w.Select(options=list(state.store_keys.values()), value=state.store_key,
                                         **labelled(w.Select, "Store"), **wide)
            self.store_select.param.watch(lambda e: state.choose_store(e.new), "value")
            stores = [self.store_select]
        self.message = pn.pane.Alert("", alert_type="warning", visible=False, css_classes=["hoverlay-message"],
                                     sizing_mode="stretch_width")
        self.pin_state = pn.pane.Markdown("following the pointer", margin=(0, 10))
        section = {"margin": (10, 10, 0, 10)}
        p = state.param
        self.sidebar = pn.Column(
            pn.pane.Markdown("### hoverlay explorer"),
            *stores,
            self.layer_select,
            w.MultiChoice.from_param(p.layers_shown, **labelled(w.MultiChoice, "Layers shown"), **wide),
            self.function_select,
            pn.Row(w.Select.from_param(p.cmap, **labelled(w.Select, "Colour map"), width=130),
                   w.Select.from_param(p.value_range, **labelled(w.Select, "Range"), width=120)),
            w.FloatSlider.from_param(p.alpha, **labelled(w.FloatSlider, "Overlay opacity"), step=0.05, **wide),
            w.FloatSlider.from_param(p.sigma_scale, **labelled(w.FloatSlider, "RBF σ (× median norm)"),
                                     step=0.05, **wide),
            pn.pane.Markdown("**Query** — hover a tile; click to pin / unpin", **section),
            pn.Row(qimage, qy, qx),
            pn.Row(self.pin_button, unpin_b),
            self.pin_state,
            pn.pane.Markdown("**Pin as B**: the query shown becomes B; A is then where the pointer rests "
                             "(or pin it): both maps, A − B and both top-k", margin=(0, 10),
                             styles={"font-size": "11px", "color": "#555"}),
            pn.Row(pin_second, clear_second),
            pn.pane.Markdown("**Images**", **section),
            w.Select.from_param(p.filter_by, **labelled(w.Select, "Filter by"), **wide, visible=p.has_metadata),
            w.Select.from_param(p.label, **labelled(w.Select, "Value"), **wide, visible=p.has_metadata),
            w.Select.from_param(p.label, **labelled(w.Select, "Label"), **wide, visible=p.has_metadata.rx.not_()),
            w.MultiChoice.from_param(p.captions, **labelled(w.MultiChoice, "Show on tiles and cards"),
                                     **wide, visible=p.has_metadata),
            w.Select.from_param(p.order, **labelled(w.Select, "Order"), **wide),
            sample_b,
            similar_b,
            pn.Row(w.IntInput.from_param(p.page_size, **labelled(w.IntInput, "Page size"), width=76),
                   w.IntInput.from_param(p.ncols, **labelled(w.IntInput, "Columns"), width=76),
                   w.IntInput.from_param(p.tile_px, **labelled(w.IntInput, "Tile px"), width=76)),
            pn.pane.Markdown("**Top-k over the whole store**", **section),
            pn.Row(w.IntInput.from_param(p.k, **labelled(w.IntInput, "k"), width=70),
                   w.Checkbox.from_param(p.live_topk, **labelled(w.Checkbox, "after each hover"),
                                         margin=(28, 10, 0, 10))),
            topk_b,
            width=290,
        )
        self._on_message()
        self._sync()

    def __panel__(self) -> pn.viewable.Viewable:
        return self.sidebar

    @param.depends("state.message", watch=True)
    def _on_message(self) -> None:
        # messages quote client values (bad URL parameters, refused updates): shown as plain text
        self.message.object = as_plain_markdown(self.state.message)
        self.message.visible = bool(self.state.message)

    @param.depends("state.store_key", watch=True)
    def _on_store(self) -> None:
        if hasattr(self, "store_select"):
            self.store_select.value = self.state.store_key

    @param.depends("state.view", "state.current", "state.pinned", "state.second", watch=True)
    def _sync(self) -> None:
        """The widgets the state cannot link itself: layer, function, query inputs, pin state."""
        state = self.state
        if state.view is None:
            return
        if list(self.layer_select.options) != state.layer_names:
            self.layer_select.options = state.layer_names
        self.layer_select.value = state.active_layer
        self.function_select.value = state.view.function
        q = state.current
        h, w = state.hw(q.layer if state.pinned and q is not None else state.active_layer)
        qimage, qy, qx = self.query_inputs
        qimage.end, qy.end, qx.end = max(0, state.reader.n_images - 1), h - 1, w - 1
        if state.pinned and q is not None:
            text = f"pinned: #{q.image} ({q.y},{q.x}) in {q.layer}"
            if q.image >= 0:  # an upload has no image number to type in
                qimage.value, qy.value, qx.value = q.image, q.y, q.x
        else:
            text = "following the pointer"
        b = state.second
        if b is not None:
            text += f"  \nB: #{b.image} ({b.y},{b.x}) in {b.layer}"
        self.pin_state.object = text
