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

#: Finds the tile and the snapping layer's cell under a pointer event ``ev`` on figure row ``me``
#: of the config columns ``c``: declares ``hit`` ({t, col, row, H, W, y, x}, or null off the tiles).
FIND_HIT_JS = """
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
"""

#: ``rows_for(c, hit, click)``: the pointer source's rows for a hit (tile, cell, click) with the
#: outline of the mapped cell in every figure of the config columns ``c``; one "left" row for null.
#: ``seq`` numbers the writes: the server drops a write equal to the source's data, and the same
#: cell after a new page (or a new upload on the query tile) is another patch, so every write differs.
#: ``drawn`` 1: the browser drew this query's maps itself and keeps them (no need to send it back).
ROWS_FOR_JS = """
function rows_for(c, h, click, drawn) {
  const out = {fig: [], tile: [], y: [], x: [], cx: [], cy: [], w: [], h: [], click: [], seq: [], drawn: []};
  const dr = drawn ? 1 : 0;
  const seq = window.hoverlay_pointer_seq = (window.hoverlay_pointer_seq || 0) + 1;
  if (h === null) {
    out.fig.push(""); out.tile.push(-1); out.y.push(-1); out.x.push(-1);
    out.cx.push(0); out.cy.push(0); out.w.push(0); out.h.push(0); out.click.push(click); out.seq.push(seq);
    out.drawn.push(0);
    return out;
  }
  for (let i = 0; i < c.fig.length; i++) {
    const S = c.S[i], Hi = c.H[i], Wi = c.W[i];
    const yi = Math.min(Hi - 1, Math.floor((h.y + 0.5) * Hi / h.H));
    const xi = Math.min(Wi - 1, Math.floor((h.x + 0.5) * Wi / h.W));
    const x0 = h.col * c.px[i], ytop = (c.nrows[i] - 1 - h.row) * c.py[i] + S;
    out.fig.push(c.fig[i]); out.tile.push(h.t); out.y.push(h.y); out.x.push(h.x);
    out.cx.push(x0 + (xi + 0.5) * S / Wi); out.cy.push(ytop - (yi + 0.5) * S / Hi);
    out.w.push(S / Wi); out.h.push(S / Hi); out.click.push(click); out.seq.push(seq); out.drawn.push(dr);
  }
  return out;
}
"""

#: CustomJS for ``mousemove``, ``tap`` and ``mouseleave`` on a grid figure.
#: args: ptr (pointer source), cfg (config source: one row per figure), me (this figure's row).
POINTER_JS = ROWS_FOR_JS + """
const ev = cb_obj;
const c = cfg.data;
""" + FIND_HIT_JS + """const d = ptr.data;
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
if (hit !== null) window.hoverlay_last_move = performance.now();
ptr.data = rows_for(c, hit, click);
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

#: The main grid's hover, computed in the browser (:mod:`explorer.browser_hover`).
#:
#: args: ``cfg`` (config: one row per figure, with the hover columns of
#: :data:`explorer.browser_hover.HOVER_COLUMNS`), ``ptr`` (the synced pointer source: written only
#: when the pointer rests on a patch, or on a click), ``hov`` (the hovered patch's outlines, not
#: synced), ``qsrc`` (the server's query vectors: the pinned query, or one this view cannot know —
#: after a page change, from the query tile; this view's own rests it keeps itself, ``E.rested``),
#: ``vecs0`` / ``vecs1`` / ``ovs`` (per figure, in ``cfg`` order: the two slots of page vectors —
#: the config's ``slot`` names the shown page's, the other may hold the next page's, sent ahead and
#: decoded here while idle — and the overlay mosaic source the browser writes in place), ``link`` (the session's hover link, shared with the other
#: browser-path views: the query tile), ``key`` (this view's name on the link), ``wasm`` (the
#: SIMD kernel's module, base64: :mod:`explorer.wasm_dot`) and ``me`` (this
#: figure's row; -1 for a data change, -2 for a change of the link).
#:
#: On a pointer move to another patch: outline it in every figure, compute cosine / dot / RBF
#: of its vector in every layer against the page's vectors of that layer (vectors arrive as
#: float16 bits — the non-zero ones and a bitmask where that is smaller, decoded once per page:
#: explorer/sparse_fp16.py — norms as float32; the same arithmetic as :func:`explorer.kernels.similarity_map`,
#: products summed by explorer/wasm_dot.py's SIMD kernel in float32, or, without WebAssembly
#: SIMD or for a dimension that is not a multiple of 8, by a scalar loop in float64), write the
#: maps into the mosaics and repaint — all in this event, no message. When the pointer rests
#: ``rest`` ms, one row goes to the server (layer view, top-k); a tap goes at once (pin / unpin).
#: Rows with ``mode`` 0 (page vectors over the byte budget) send every patch change at once
#: instead, and the server draws the maps, as before.
#:
#: A page's vectors come in a message after its images and config: a figure computes maps only
#: from vectors whose ``page`` is the config's (until they come its overlay is empty, never the
#: last page's maps), and a move made meanwhile is drawn, and passed to the other views, when
#: they arrive.
#:
#: The hovered patch's vectors also go on the link (``link._hoverlay``: owner, layer names, one
#: vector and norm per layer, and the owner's vectors it was cut from) and a counter in its data
#: wakes the other views, which draw their maps for it in the same event; a view's own hover wins over the link's, the link's
#: over the server's query, and a pin over both. The link's query is dropped once its owner's
#: page changed; leaving the owner's tiles clears it (the views keep their maps until the
#: server's query, the rest, arrives).
GRID_HOVER_JS = ROWS_FOR_JS + """
const c = cfg.data;
let E = cfg._hoverlay;
if (E === undefined) {
  E = cfg._hoverlay = {hover: null, timer: null, table: null, dec: new WeakMap(), frame: 0, rested: null,
                       redraw: null};
}
const browser = c.mode !== undefined && c.mode.length > 0 && c.mode[0] === 1;
const page_now = c.page !== undefined && c.page.length > 0 ? c.page[0] : -1;
const slot = c.slot !== undefined && c.slot.length > 0 ? c.slot[0] : 0;
const vecs = slot === 1 ? vecs1 : vecs0, others = slot === 1 ? vecs0 : vecs1;  // shown page's | ahead

function ready(i) {  // figure i holds the vectors of the page the config shows (they come after it)
  const p = vecs[i].data.page;
  return p !== undefined && p.length > 0 && p[0] === page_now;
}
function all_ready() {
  for (let i = 0; i < c.fig.length; i++) if (!ready(i)) return false;
  return c.fig.length > 0;
}

function table() {  // float16 bits -> float32, built once per page load
  if (E.table === null) {
    const t = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
      t[h] = e === 0 ? s * m * Math.pow(2, -24)
           : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * Math.pow(2, e - 15);
    }
    E.table = t;
  }
  return E.table;
}
function dots_module() {  // explorer/wasm_dot.py's SIMD kernel, compiled once per window (null: none)
  if (window.hoverlay_dots_module === undefined) {
    let m = null;
    try {
      const raw = atob(wasm), b = new Uint8Array(raw.length);
      for (let i = 0; i < raw.length; i++) b[i] = raw.charCodeAt(i);
      if (typeof WebAssembly === "object" && WebAssembly.validate(b)) m = new WebAssembly.Module(b);
    } catch (err) { m = null; }
    window.hoverlay_dots_module = m;
  }
  return window.hoverlay_dots_module;
}
function kernel_for(n, D) {  // a kernel instance whose memory holds a layer's page: F | q | out
  const mod = D % 8 === 0 ? dots_module() : null;
  if (mod === null) return null;
  try {
    const inst = new WebAssembly.Instance(mod, {}), mem = inst.exports.memory, P = n / D;
    const more = Math.ceil(4 * (n + D + P) / 65536) - mem.buffer.byteLength / 65536;
    if (more > 0) mem.grow(more);  // once: views of the memory stay valid as it never grows again
    return {dots: inst.exports.dots, P: P, F: new Float32Array(mem.buffer, 0, n),
            q: new Float32Array(mem.buffer, 4 * n, D), out: new Float32Array(mem.buffer, 4 * (n + D), P)};
  } catch (err) { return null; }
}
function decoded(v, D) {  // once per page and layer: {F: float32, K: its kernel, or null}
  const bits = v.v[0], mask = v.mask !== undefined ? v.mask[0] : null;
  let out = E.dec.get(bits);
  if (out === undefined) {
    const t = table(), n = v.norm[0].length * D, K = kernel_for(n, D);
    const F = K !== null ? K.F : new Float32Array(n);  // in the kernel's memory where one runs
    if (mask === null || mask.length === 0) {
      for (let i = 0; i < n; i++) F[i] = t[bits[i]];
    } else {  // explorer/sparse_fp16.py: non-zero values only; bit i % 8 of byte i / 8 marks value i
      F.fill(0);
      for (let j = 0, k = 0; j < mask.length; j++) {
        for (let b = mask[j]; b !== 0; b &= b - 1) F[8 * j + 31 - Math.clz32(b & -b)] = t[bits[k++]];
      }
    }
    out = {F: F, K: K};
    E.dec.set(bits, out);
    window.hoverlay_kernel = K !== null ? "wasm-simd" : "js";
  }
  return out;
}
function pinned() {
  const s = qsrc.data;
  return s.pinned.length > 0 && s.pinned[0] === 1;
}
function hovered_query(h) {  // the hovered patch's vector in every layer, from the page's vectors
  const Q = [];
  for (let i = 0; i < c.fig.length; i++) {
    if (!ready(i)) { Q.push(null); continue; }  // this page's vectors have not arrived yet
    const Hi = c.H[i], Wi = c.W[i], D = c.D[i];
    const yi = Math.min(Hi - 1, Math.floor((h.y + 0.5) * Hi / h.H));
    const xi = Math.min(Wi - 1, Math.floor((h.x + 0.5) * Wi / h.W));
    const p = (h.t * Hi + yi) * Wi + xi;
    const V = decoded(vecs[i].data, D).F;
    Q.push({q: V.subarray(p * D, (p + 1) * D), qn: vecs[i].data.norm[0][p]});
  }
  return Q;
}
function server_query() {
  const s = qsrc.data;
  // this view's own last rest, kept here: the server learns it from the rest and does not send
  // it back; any query the server sends later (a page, a pin, the query tile) replaces it
  if (E.rested !== null && E.rested.data === s && !pinned()) return E.rested.Q;
  if (s.fig.length === 0) return null;
  const Q = [];
  for (let i = 0; i < c.fig.length; i++) {
    const j = s.fig.indexOf(c.fig[i]);
    Q.push(j < 0 ? null : {q: s.q[j], qn: s.qn[j]});
  }
  return Q;
}
function own_fresh() {  // the hovered patch is on the page shown, whose vectors are here
  return E.hover !== null && E.hover.page === page_now && all_ready();
}
function linked() {  // another view's hovered query, per figure of this one (null: none, or stale)
  const L = link._hoverlay;
  if (L === undefined || L === null || L.owner === key) return null;
  const owner_page = L.csrc.data.page;
  if (owner_page === undefined || owner_page[0] !== L.page) return null;  // the owner shows another page
  const Q = [];
  for (let i = 0; i < c.fig.length; i++) {
    const j = L.fig.indexOf(c.fig[i]);
    Q.push(j < 0 ? null : L.Q[j]);
  }
  return Q;
}
function publish(Q) {  // this view's hovered query, for the others (null: no longer hovered here)
  const L = link._hoverlay;
  if (Q === null) {
    if (L !== undefined && L !== null && L.owner === key) link._hoverlay = null;
    return;
  }
  link._hoverlay = {owner: key, fig: c.fig.slice(), Q: Q, csrc: cfg, page: page_now};
  link.data = {n: [(link.data.n !== undefined && link.data.n.length ? link.data.n[0] : 0) + 1]};
}
function current() {
  if (!pinned()) {
    if (own_fresh()) return hovered_query(E.hover);
    const l = linked();
    if (l !== null) return l;
  }
  return server_query();
}
function paint(Q) {
  const t0 = performance.now();
  for (let i = 0; i < c.fig.length; i++) {
    const img = ovs[i].data.image[0];
    img.fill(NaN);
    const Hi = c.H[i], Wi = c.W[i], D = c.D[i], n = c.n[i];
    const gy = c.gy[i], gx = c.gx[i], band = c.band[i], NC = c.ncols[i], NR = c.nrows[i];
    const rows = NR * (Hi + gy + band) - gy, cols = NC * (Wi + gx) - gx;
    const N = vecs[i].data.norm[0];
    const q = Q === null ? null : Q[i];
    if (q !== null && ready(i) && img.length === rows * cols && N.length === n * Hi * Wi) {
      const {F, K} = decoded(vecs[i].data, D), qv = q.q, qn = q.qn, fn = c.fn[i], k = -0.5 / (c.sigma[i] * c.sigma[i]);
      let S = null;
      if (K !== null) {  // every patch's dot product at once, four lanes at a time (explorer/wasm_dot.py)
        K.q.set(qv);
        K.dots(0, 4 * F.length, 4 * (F.length + D), K.P, D);
        S = K.out;
      }
      for (let t = 0, p = 0; t < n; t++) {
        const top = Math.floor(t / NC) * (Hi + gy + band) + band, left = (t % NC) * (Wi + gx);
        for (let y = 0; y < Hi; y++) {
          const base = (rows - 1 - top - y) * cols + left;
          for (let x = 0; x < Wi; x++, p++) {
            let s;
            if (S !== null) s = S[p];
            else {  // four accumulators: independent adds keep the CPU's pipelines full (2x on D >= 240)
              let s0 = 0, s1 = 0, s2 = 0, s3 = 0, d = 0;
              const o = p * D;
              for (; d + 3 < D; d += 4) {
                s0 += F[o + d] * qv[d]; s1 += F[o + d + 1] * qv[d + 1];
                s2 += F[o + d + 2] * qv[d + 2]; s3 += F[o + d + 3] * qv[d + 3];
              }
              for (; d < D; d++) s0 += F[o + d] * qv[d];
              s = (s0 + s1) + (s2 + s3);
            }
            if (fn === "dot") s = s * N[p] * qn;
            else if (fn === "rbf") s = Math.exp(Math.max(0, N[p] * N[p] + qn * qn - 2 * qn * N[p] * s) * k);
            img[base + x] = s;
          }
        }
      }
    }
  }
  const t1 = performance.now();
  for (const ov of ovs) ov.change.emit();  // Bokeh maps the new values through the colour mapper
  const now = performance.now();
  window.hoverlay_compute_ms = t1 - t0;
  window.hoverlay_emit_ms = now - t1;
  window.hoverlay_updates = (window.hoverlay_updates || 0) + 1;
  window.hoverlay_browser_paints = (window.hoverlay_browser_paints || 0) + 1;
  window.hoverlay_last_update = now;
  const times = window.hoverlay_update_times = window.hoverlay_update_times || {};
  for (const ov of ovs) times[ov.name] = now;
  requestAnimationFrame(() => {
    const t = performance.now(), paints = window.hoverlay_paint_times = window.hoverlay_paint_times || {};
    for (const ov of ovs) paints[ov.name] = t;
  });
}
function send(h, click, drawn) {  // the only messages of the hover path
  if (E.timer !== null) { clearTimeout(E.timer); E.timer = null; }
  ptr.data = rows_for(cfg.data, h, click, drawn);
}
const clicks = () => ptr.data.click.length ? ptr.data.click[0] : 0;

if (me === -2) {  // another view hovered a patch: draw its maps now, in the same event
  const L = link._hoverlay;
  if (browser && L !== undefined && L !== null && L.owner !== key && !pinned() && !own_fresh()) {
    const l = linked();
    if (l !== null) paint(l);
  }
  return;
}
if (me < 0 && browser) {  // a page sent ahead: decode it while idle, so that its first hover is not slowed
  for (let i = 0; i < others.length; i++) {
    const o = others[i].data;
    if (o.page !== undefined && o.page.length > 0 && o.page[0] === -1 && o.v[0].length > 0 && !E.dec.has(o.v[0])) {
      const D = c.D[i];
      const later = (f) => window.requestIdleCallback !== undefined ? window.requestIdleCallback(f) : setTimeout(f, 0);
      later(() => { if (others[i].data === o && o.norm[0].length * D > 0) decoded(o, D); });  // one layer per idle slot
    }
  }
}
if (me < 0) {  // page vectors, query vectors or config changed: repaint once, next frame
  // the frame draws with the latest change's view of the sources (several may come in one message)
  E.redraw = !browser ? null : () => {
    if (E.hover !== null && !E.hover.ready && own_fresh()) {  // a move made before the page's vectors came
      E.hover.ready = true;
      if (!pinned()) publish(hovered_query(E.hover));
    }
    paint(current());
  };
  if (browser && E.frame === 0) {
    E.frame = requestAnimationFrame(() => { E.frame = 0; if (E.redraw !== null) E.redraw(); });
  }
  return;
}
const ev = cb_obj;
""" + FIND_HIT_JS + """if (ev.event_name === "tap") {
  if (hit !== null) send(hit, clicks() + 1);
  return;
}
const last = E.hover;
if (hit === null) {  // off the tiles: the server's query (a rest, a pin, the query tile) draws next
  if (hov.data.fig.length) hov.data = {fig: [], tile: [], y: [], x: [], cx: [], cy: [], w: [], h: []};
  E.hover = null;
  publish(null);
  return;
}
if (last !== null && last.page === page_now
    && hit.t === last.t && hit.y === last.y && hit.x === last.x && hov.data.fig.length) {
  return;
}
window.hoverlay_last_move = performance.now();
hit.page = page_now;
hit.ready = all_ready();
E.hover = hit;
const out = rows_for(c, hit, 0);
delete out.click;
delete out.seq;
delete out.drawn;
hov.data = out;
if (!browser) {
  send(hit, clicks());
  return;
}
if (!pinned()) {
  const Q = hovered_query(hit);
  paint(Q);
  publish(Q);
  if (E.timer !== null) clearTimeout(E.timer);
  E.timer = setTimeout(() => {
    E.timer = null;
    if (pinned()) return;
    const fresh = own_fresh();  // not when the page's vectors changed since this move
    E.rested = fresh ? {data: qsrc.data, Q: hovered_query(E.hover).map(r => ({q: r.q.slice(), qn: r.qn}))} : null;
    send(E.hover, clicks(), fresh);
  }, c.rest[me]);
}
"""
