"""NMF groups on the main grid: each patch coloured by its group, and a legend of each group's top patches.

``hoverlay factorize`` stores, per layer, every patch's group (argmax of its NMF weights, -1 =
none) — read through :func:`stores.groups.read_groups`, never through the pipeline. When a
shown layer has groups, the grid offers an overlay mode:

- ``similarity``: the usual similarity overlays;
- ``groups``: each patch filled with its group's colour (fixed categorical palette, group -1
  transparent); hovering still drives the query layer view and top-k below the grid;
- ``groups + similarity``: the similarity fill *and* every cell outlined in its group's colour,
  so hovering keeps showing similarity on the grid itself.

The group image of a page is one RGBA mosaic per layer, built like the similarity mosaic
(:meth:`explorer.figures.GridSpec.mosaic`) and sent once per page or mode change, never per
hover. The colouring and the legend's ranking are pure functions below, tested without Panel.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource, GlyphRenderer, ImageRGBA
from bokeh.palettes import Category10_10, Category20_20

from hoverlay.stores import StoreReader
from hoverlay.stores.groups import NO_GROUP, read_group_meta, read_group_weights, read_groups

from .resources import get_reader, sample_ids
from .state import ExplorerState
from .topk import Hit, crop_jpeg, crop_uri
from .widgets import labelled

if TYPE_CHECKING:
    from .figures import LayerFigure

#: Fixed categorical palette: group g gets ``GROUP_PALETTE[g % 20]`` in every view and session.
#: Category10 first (the most distinct hues), then Category20's lighter tints.
GROUP_PALETTE: tuple[str, ...] = (*Category10_10, *Category20_20[1::2])
MODES: tuple[str, ...] = ("similarity", "groups", "groups + similarity")
#: Images scanned for the legend's top patches (spread evenly over the store).
LEGEND_IMAGES = 4096
LEGEND_PATCHES = 4  # crops per group
LEGEND_BATCH = 256  # images read at once while scanning


# ------------------------------------------------------------------------------- colouring
def group_palette_index(groups: np.ndarray) -> np.ndarray:
    """Palette slot of each patch's group (int64, same shape); -1 (or NaN) stays -1: no colour."""
    g = np.asarray(groups, dtype=np.float64)
    missing = ~np.isfinite(g) | (g < 0)
    out = np.where(missing, 0, g).astype(np.int64) % len(GROUP_PALETTE)
    out[missing] = NO_GROUP
    return out


def hex_rgba(color: str, alpha: int = 255) -> np.ndarray:
    """'#1f77b4' -> uint8 [r, g, b, alpha]."""
    c = color.lstrip("#")
    return np.array([int(c[i:i + 2], 16) for i in (0, 2, 4)] + [alpha], dtype=np.uint8)


_PALETTE_RGBA = np.stack([hex_rgba(c) for c in GROUP_PALETTE] + [np.zeros(4, np.uint8)])  # last: clear


def group_colors(groups: np.ndarray) -> np.ndarray:
    """uint32 RGBA (Bokeh's packing) per patch: its group's palette colour, transparent for -1/NaN."""
    idx = group_palette_index(groups)
    rgba = _PALETTE_RGBA[np.where(idx < 0, len(GROUP_PALETTE), idx)]
    return np.ascontiguousarray(rgba).view(np.uint32).reshape(idx.shape)


def outline_cells(colors: np.ndarray, cell_px: int, width: int = 1) -> np.ndarray:
    """Each cell of a (R, C) colour image as a ring of ``width`` px inside a cell_px² block.

    The result (R·cell_px, C·cell_px) keeps a cell's colour on its border and is transparent
    inside, so the similarity fill stays visible under the group outlines.
    """
    big = np.repeat(np.repeat(colors, cell_px, axis=0), cell_px, axis=1)
    pos = np.arange(cell_px)
    edge = (pos < width) | (pos >= cell_px - width)
    ring = edge[:, None] | edge[None, :]
    mask = np.tile(ring, colors.shape)
    return np.where(mask, big, np.uint32(0))


# --------------------------------------------------------------------------------- legend
@dataclass(frozen=True)
class GroupPatch:
    """A patch of the legend: one of the largest weights of its group."""

    image: int
    y: int
    x: int
    weight: float


def top_group_patches(groups: np.ndarray, weights: np.ndarray, ids: np.ndarray, m: int,
                      best: list[list[GroupPatch]] | None = None) -> list[list[GroupPatch]]:
    """Per group, the ``m`` patches of that group with the largest weight for it.

    ``groups`` (n, H, W), ``weights`` (n, H, W, k) of images ``ids``; ``best`` (a previous
    batch's result) is merged in, so a store is ranked in bounded memory. Ties break by
    (image, y, x) so the legend is the same in every process.
    """
    n, h, w, k = weights.shape
    out = [list(b) for b in best] if best is not None else [[] for _ in range(k)]
    for g in range(k):
        score = np.where(groups == g, weights[..., g].astype(np.float32), -np.inf).ravel()
        finite = int(np.isfinite(score).sum())
        take = min(m, finite)
        if take:
            top = np.argpartition(-score, take - 1)[:take]
            img, rest = np.divmod(top, h * w)
            yy, xx = np.divmod(rest, w)
            out[g] += [GroupPatch(int(ids[i]), int(a), int(b), float(score[t]))
                       for i, a, b, t in zip(img, yy, xx, top, strict=True)]
        out[g] = sorted(out[g], key=lambda p: (-p.weight, p.image, p.y, p.x))[:m]
    return out


def scan_top_patches(reader: StoreReader, layer: str, m: int = LEGEND_PATCHES,
                     max_images: int = LEGEND_IMAGES) -> list[list[GroupPatch]]:
    """Top patches per group over (a spread-out sample of) the factorised images, batch by batch."""
    meta = read_group_meta(reader, layer)
    if meta is None:
        return []
    ids = sample_ids(min(reader.n_images, int(meta["images_covered"])), max_images)
    best: list[list[GroupPatch]] = [[] for _ in range(int(meta["k"]))]
    for lo in range(0, len(ids), LEGEND_BATCH):
        batch = ids[lo:lo + LEGEND_BATCH]
        got, weights = read_groups(reader, layer, batch), read_group_weights(reader, layer, batch)
        if got is None or weights is None:
            break
        best = top_group_patches(got[0], weights, batch, m, best)
    return best


def legend_html(layer: str, group: int, size: int | None, crops: Sequence[tuple[GroupPatch, bytes]]) -> str:
    """One group's legend card: swatch, name, size, crops; data-* attributes for browser tests."""
    color = GROUP_PALETTE[group % len(GROUP_PALETTE)]
    imgs = "".join(
        f'<img class="group-patch" data-image="{p.image}" data-y="{p.y}" data-x="{p.x}" '
        f'data-weight="{p.weight:.6f}" width="56" height="56" style="image-rendering:pixelated" '
        f'title="#{p.image} ({p.y},{p.x}) weight {p.weight:.3f}" '
        f'src="{crop_uri(jpeg)}"/>' for p, jpeg in crops)
    count = f" · {size} patches" if size is not None else ""
    return (f'<div class="group-legend-item" data-layer="{html.escape(layer)}" data-group="{group}" '
            f'data-color="{color}" style="font-size:11px;line-height:1.3">'
            f'<div><span style="display:inline-block;width:12px;height:12px;background:{color};'
            f'border:1px solid #333;vertical-align:middle;margin-right:4px"></span>'
            f'<b>group {group}</b>{count}</div>'
            f'<div style="display:flex;gap:2px;margin-top:2px">{imgs}</div></div>')


def _legend_cards(url: str, layer: str, n_images: int) -> list[str]:
    """Legend cards of one layer (cached per process: the scan reads many images' weights)."""
    reader = get_reader(url)
    meta = read_group_meta(reader, layer) or {}
    sizes = list(meta.get("group_sizes", []))
    cards = []
    for g, patches in enumerate(scan_top_patches(reader, layer)):
        crops = [(p, crop_jpeg(reader, layer, Hit(p.image, p.y, p.x, p.weight, ""), size=56)) for p in patches]
        cards.append(legend_html(layer, g, int(sizes[g]) if g < len(sizes) else None, crops))
    return cards


# ----------------------------------------------------------------------------------- view
class GroupsOverlay(pn.viewable.Viewer):
    """The overlay-mode switch, the group mosaics of the main grid's figures, and the legend.

    The grid calls :meth:`attach` after (re)building its figures and :meth:`show_page` when the
    page's images change; everything else follows the mode widget and the state's opacity.
    The view itself is the mode switch; :attr:`legend` goes below the grid.
    """

    state = param.ClassSelector(class_=ExplorerState, doc="The session's state.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._doc = pn.state.curdoc
        self.mode = pn.widgets.RadioButtonGroup(**labelled(pn.widgets.RadioButtonGroup, "Overlay"),
                                                options=list(MODES), value=MODES[0], margin=(6, 10))
        self.status = pn.pane.Markdown("", margin=(6, 10))
        self.panel = pn.Row(pn.pane.Markdown("**Overlay**", margin=(6, 0, 0, 10)), self.mode, self.status,
                            visible=False)
        self.legend = pn.FlexBox(css_classes=["group-legend"], visible=False)
        self.layers: dict[str, dict[str, Any]] = {}  # layer -> groups metadata, for layers that have them
        self._figures: list[LayerFigure] = []
        self._sources: dict[str, ColumnDataSource] = {}
        self._renderers: dict[str, tuple[GlyphRenderer, GlyphRenderer]] = {}
        self._page_groups: dict[str, np.ndarray] = {}
        self.mode.param.watch(lambda e: self._apply_mode(), "value")

    def __panel__(self) -> pn.viewable.Viewable:
        return self.panel

    @param.depends("state.alpha", watch=True)
    def _on_alpha(self) -> None:
        self._apply_mode()

    def attach(self, figures: Sequence[LayerFigure]) -> None:
        """Add a group-image glyph to every figure whose layer has groups (just above the similarity)."""
        reader = self.state.reader
        self.layers = {}
        for fig in figures:
            meta = read_group_meta(reader, fig.layer)
            if meta is not None:
                self.layers[fig.layer] = meta
        self._figures = [f for f in figures if f.layer in self.layers]
        self._sources, self._renderers, self._page_groups = {}, {}, {}
        for fig in self._figures:
            src = fig.shared.source({"image": [np.zeros((1, 1), np.uint32)], "x": [0.0], "y": [0.0],
                                     "dw": [fig.spec.data_width], "dh": [fig.spec.data_height]},
                                    name=f"grid-groups:{fig.layer}")
            groups_r = fig.plot.add_glyph(src, ImageRGBA(image="image", x="x", y="y", dw="dw", dh="dh"),
                                          level="overlay", visible=False)
            similarity_r = next(r for r in fig.plot.renderers if getattr(r, "glyph", None) is fig.glyph)
            rs = [r for r in fig.plot.renderers if r is not groups_r]  # draw groups under the outlines
            rs.insert(rs.index(similarity_r) + 1, groups_r)
            fig.plot.renderers = rs
            self._sources[fig.layer] = src
            self._renderers[fig.layer] = (similarity_r, groups_r)
        self.panel.visible = bool(self.layers)
        self.legend.objects = []
        self.status.object = ("groups of " + ", ".join(f"`{name}` (k={meta['k']})" for name, meta in self.layers.items())
                              if self.layers else "")

    def show_page(self, ids: np.ndarray) -> None:
        """Read the page's groups (cheap: int16 per patch) and redraw the group mosaics."""
        self._page_groups = {}
        for fig in self._figures:
            got = read_groups(self.state.reader, fig.layer, np.asarray(ids, dtype=np.int64))
            if got is not None:
                self._page_groups[fig.layer] = fig.spec.mosaic(got[0].astype(np.float32), len(ids))
        self._apply_mode(legend=False)

    def _apply_mode(self, legend: bool = True) -> None:
        mode = self.mode.value
        with pn.io.hold(self._doc):
            for fig in self._figures:
                similarity_r, groups_r = self._renderers[fig.layer]
                similarity_r.visible = mode != "groups"
                groups_r.visible = mode != "similarity"
                groups_r.glyph.global_alpha = 1.0 if mode == "groups + similarity" else max(0.5, self.state.alpha)
                mosaic = self._page_groups.get(fig.layer)
                if mosaic is not None and mode != "similarity":
                    self._sources[fig.layer].data.update(image=[self._group_image(fig, mosaic, mode)])
        if legend:
            self._show_legend(mode != "similarity")

    def export(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
        """What an exported PNG shows of the groups: per layer ``(n, H, W)`` groups of the page,
        and legend entries ``(colour, text)``; nothing while the overlay shows similarity only."""
        if self.mode.value == "similarity" or not self._figures:
            return {}, []
        out, legend = {}, []
        for fig in self._figures:
            got = read_groups(self.state.reader, fig.layer, np.asarray(ids, dtype=np.int64))
            if got is not None:
                out[fig.layer] = got[0]
            k = int(self.layers.get(fig.layer, {}).get("k", 0))
            legend += [(GROUP_PALETTE[g % len(GROUP_PALETTE)], f"{fig.layer} group {g}") for g in range(k)]
        return out, legend

    def _group_image(self, fig: LayerFigure, mosaic: np.ndarray, mode: str) -> np.ndarray:
        colors = group_colors(mosaic)
        if mode != "groups + similarity":
            return colors
        # about one image pixel per screen pixel, so the 1-px rings stay thin on screen
        cell_px = int(np.clip(np.ceil(fig.spec.tile_px / fig.hw[1]), 4, 16))
        return outline_cells(colors, cell_px, width=1)

    def _show_legend(self, visible: bool) -> None:
        self.legend.visible = visible and bool(self.layers)
        if not self.legend.visible or self.legend.objects:
            return
        url, n = str(self.state.store), self.state.reader.n_images
        items: list[Any] = []
        for layer, meta in self.layers.items():
            items.append(pn.pane.Markdown(
                f"**NMF groups of `{layer}`** (k={meta['k']}, {meta['method']}, "
                f"{meta['images_factorized']} images; reconstruction error {meta['reconstruction_error']:.3f}) "
                f"— crops: each group's patches with the largest weights", sizing_mode="stretch_width",
                margin=(10, 10, 0, 10)))
            cards = pn.state.as_cached("hoverlay-group-legend", _legend_cards, url=url, layer=layer, n_images=n)
            items += [pn.pane.HTML(card, margin=(2, 8)) for card in cards]
        self.legend.objects = items
