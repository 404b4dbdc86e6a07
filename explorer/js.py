"""The little JavaScript the hover path runs in the browser.

Snapping the pointer to a patch and outlining it happen client-side: the browser only talks to
the server when the patch under the pointer changes (one small ``ColumnDataSource`` change that
carries the tile, the cell and the outline of the mapped cell in every shown layer), and the
outline moves without waiting for a round trip. The arithmetic is the one of
:func:`explorer.kernels.pointer_to_patch` and :func:`explorer.kernels.map_patch`.

A few ``window`` globals are kept for measurement and browser tests, at the cost of a counter
increment: ``hoverlay_last_move`` (``performance.now()`` when a new patch was sent),
``hoverlay_updates`` / ``hoverlay_last_update`` (count and time of overlay data changes) and,
per overlay source name, ``hoverlay_update_times`` and ``hoverlay_paint_times`` (the animation
frame after the change).
"""

from __future__ import annotations

#: CustomJS for ``mousemove``, ``tap`` and ``mouseleave`` on a grid figure.
#: args: ptr (pointer source), cfg (config source: one row per figure), me (this figure's row).
POINTER_JS = """
const ev = cb_obj;
const c = cfg.data;
let hit = null;
if (ev.event_name !== "mouseleave" && c.fig.length > me) {
  const S = c.S[me], PX = c.px[me], PY = c.py[me], NC = c.ncols[me], NR = c.nrows[me];
  const col = Math.floor(ev.x / PX), rb = Math.floor(ev.y / PY), row = NR - 1 - rb;
  const t = row * NC + col;
  const px = ev.x - col * PX, py = rb * PY + S - ev.y;
  if (col >= 0 && col < NC && row >= 0 && row < NR && t < c.n[me]
      && px >= 0 && px <= S && py >= 0 && py <= S) {
    const s = Math.max(0, c.selected.indexOf(1));
    const H = c.H[s], W = c.W[s];
    hit = {t: t, col: col, row: row, H: H, W: W,
           y: Math.min(H - 1, Math.floor(py * H / S)), x: Math.min(W - 1, Math.floor(px * W / S))};
  }
}
const d = ptr.data;
const last = d.tile.length ? [d.tile[0], d.y[0], d.x[0]] : [-1, -1, -1];
let click = d.click.length ? d.click[0] : 0;
if (ev.event_name === "tap") {
  if (hit === null) return;
  click += 1;
} else if (hit === null) {
  if (last[0] < 0) return;
} else if (hit.t === last[0] && hit.y === last[1] && hit.x === last[2]) {
  return;
}
const out = {fig: [], tile: [], y: [], x: [], cx: [], cy: [], w: [], h: [], click: []};
if (hit === null) {
  out.fig.push(""); out.tile.push(-1); out.y.push(-1); out.x.push(-1);
  out.cx.push(0); out.cy.push(0); out.w.push(0); out.h.push(0); out.click.push(click);
} else {
  for (let i = 0; i < c.fig.length; i++) {
    const S = c.S[i], Hi = c.H[i], Wi = c.W[i];
    const yi = Math.min(Hi - 1, Math.floor((hit.y + 0.5) * Hi / hit.H));
    const xi = Math.min(Wi - 1, Math.floor((hit.x + 0.5) * Wi / hit.W));
    const x0 = hit.col * c.px[i], ytop = (c.nrows[i] - 1 - hit.row) * c.py[i] + S;
    out.fig.push(c.fig[i]); out.tile.push(hit.t); out.y.push(hit.y); out.x.push(hit.x);
    out.cx.push(x0 + (xi + 0.5) * S / Wi); out.cy.push(ytop - (yi + 0.5) * S / Hi);
    out.w.push(S / Wi); out.h.push(S / Hi); out.click.push(click);
  }
  window.hoverlay_last_move = performance.now();
}
ptr.data = out;
"""

#: CustomJS on every overlay source's ``data``: counts and times updates for tests and benchmarks
#: (per source name, and the next animation frame after it, i.e. the repaint).
OVERLAY_CHANGED_JS = """
const now = performance.now();
window.hoverlay_updates = (window.hoverlay_updates || 0) + 1;
window.hoverlay_last_update = now;
(window.hoverlay_update_times = window.hoverlay_update_times || {})[cb_obj.name] = now;
requestAnimationFrame(() => {
  (window.hoverlay_paint_times = window.hoverlay_paint_times || {})[cb_obj.name] = performance.now();
});
"""
