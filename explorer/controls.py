"""The explorer's sidebar: widgets bound to :class:`explorer.app.ExplorerApp` parameters.

Kept apart from the app so the app module is about state and data flow; every widget here
either mirrors a parameter (``from_param``) or calls one app method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import panel as pn

from .kernels import SIMILARITY_FUNCTIONS
from .widgets import button, colored, labelled

if TYPE_CHECKING:
    from .app import ExplorerApp


@dataclass
class Controls:
    """The sidebar and the widgets the app writes back to."""

    sidebar: pn.Column
    navigation: pn.Row
    message: pn.pane.Alert
    layer_select: pn.widgets.Select
    function_select: pn.widgets.Select
    query_inputs: tuple[pn.widgets.IntInput, pn.widgets.IntInput, pn.widgets.IntInput]
    pin_button: pn.widgets.Button
    pin_state: pn.pane.Markdown
    page_info: pn.pane.Markdown


def build_controls(app: ExplorerApp) -> Controls:
    w = pn.widgets
    wide = {"width": 260}
    layer_select = w.Select(**labelled(w.Select, "Layer (pointer snaps to)"), options=app.layer_names,
                            value=app.active_layer, **wide)
    function_select = w.Select(**labelled(w.Select, "Similarity"), options=list(SIMILARITY_FUNCTIONS),
                               value="cosine", **wide)
    # layer and function are plain strings (URL-mirrored, validated by the app), so link by hand
    layer_select.param.watch(lambda e: setattr(app, "layer", e.new), "value")
    function_select.param.watch(lambda e: setattr(app, "function", e.new), "value")
    qimage = w.IntInput(**labelled(w.IntInput, "image"), value=0, start=0, width=80)
    qy = w.IntInput(**labelled(w.IntInput, "y"), value=0, start=0, width=60)
    qx = w.IntInput(**labelled(w.IntInput, "x"), value=0, start=0, width=60)
    pin_b = button("Pin query", "primary", width=110)
    pin_b.on_click(lambda e: app.pin(qimage.value or 0, qy.value or 0, qx.value or 0))
    unpin_b = button("Unpin", width=80)
    unpin_b.on_click(lambda e: app.unpin())
    prev_b, next_b = button("◀ prev", width=70), button("next ▶", width=70)
    prev_b.on_click(lambda e: app.go(-1))
    next_b.on_click(lambda e: app.go(+1))
    page_info = pn.pane.Markdown("", margin=(8, 10))
    sample_b = button("Random sample", width=120)
    sample_b.on_click(lambda e: app.random_sample())
    similar_b = button("Most similar to query", width=170)
    similar_b.on_click(lambda e: app.sort_by_similarity())
    topk_b = button("Search top-k now", width=140)
    topk_b.on_click(lambda e: app.search_topk())
    download = w.FileDownload(callback=app.export_png, filename="hoverlay-grid.png", label="Export grid PNG",
                              width=160, **colored(w.FileDownload, "success"))
    stores = []
    if len(app.store_keys) > 1:  # by display name: the browser never sees a server path
        store_select = w.Select(options=list(app.store_keys.values()), value=app.store_key,
                                **labelled(w.Select, "Store"), **wide)
        store_select.param.watch(lambda e: app.choose_store(e.new), "value")
        app.param.watch(lambda e: setattr(store_select, "value", e.new), "store_key")
        stores = [store_select]
    message = pn.pane.Alert("", alert_type="warning", visible=False, css_classes=["hoverlay-message"],
                            sizing_mode="stretch_width")
    pin_state = pn.pane.Markdown("following the pointer", margin=(0, 10))
    section = {"margin": (10, 10, 0, 10)}
    sidebar = pn.Column(
        pn.pane.Markdown("### hoverlay explorer"),
        *stores,
        layer_select,
        w.MultiChoice.from_param(app.param.layers_shown, **labelled(w.MultiChoice, "Layers shown"), **wide),
        function_select,
        pn.Row(w.Select.from_param(app.param.cmap, **labelled(w.Select, "Colour map"), width=130),
               w.Select.from_param(app.param.value_range, **labelled(w.Select, "Range"), width=120)),
        w.FloatSlider.from_param(app.param.alpha, **labelled(w.FloatSlider, "Overlay opacity"), step=0.05, **wide),
        w.FloatSlider.from_param(app.param.sigma_scale, **labelled(w.FloatSlider, "RBF σ (× median norm)"),
                                 step=0.05, **wide),
        pn.pane.Markdown("**Query** — hover a tile; click to pin / unpin", **section),
        pn.Row(qimage, qy, qx),
        pn.Row(pin_b, unpin_b),
        pin_state,
        pn.pane.Markdown("**Images**", **section),
        w.Select.from_param(app.param.filter_by, **labelled(w.Select, "Filter by"), **wide,
                            visible=app.param.has_metadata),
        w.Select.from_param(app.param.label, **labelled(w.Select, "Value"), **wide,
                            visible=app.param.has_metadata),
        w.Select.from_param(app.param.label, **labelled(w.Select, "Label"), **wide,
                            visible=app.param.has_metadata.rx.not_()),
        w.MultiChoice.from_param(app.param.captions, **labelled(w.MultiChoice, "Show on tiles and cards"),
                                 **wide, visible=app.param.has_metadata),
        w.Select.from_param(app.param.order, **labelled(w.Select, "Order"), **wide),
        sample_b,
        similar_b,
        pn.Row(w.IntInput.from_param(app.param.page_size, **labelled(w.IntInput, "Page size"), width=76),
               w.IntInput.from_param(app.param.ncols, **labelled(w.IntInput, "Columns"), width=76),
               w.IntInput.from_param(app.param.tile_px, **labelled(w.IntInput, "Tile px"), width=76)),
        pn.pane.Markdown("**Top-k over the whole store**", **section),
        pn.Row(w.IntInput.from_param(app.param.k, **labelled(w.IntInput, "k"), width=70),
               w.Checkbox.from_param(app.param.live_topk, **labelled(w.Checkbox, "after each hover"),
                                     margin=(28, 10, 0, 10))),
        topk_b,
        download,
        width=290,
    )
    return Controls(sidebar=sidebar, navigation=pn.Row(prev_b, next_b, page_info), message=message,
                    layer_select=layer_select, function_select=function_select,
                    query_inputs=(qimage, qy, qx), pin_button=pin_b, pin_state=pin_state,
                    page_info=page_info)
