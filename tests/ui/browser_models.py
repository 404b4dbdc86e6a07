"""Helpers shared by the browser tests: reading Bokeh models from the page."""

from __future__ import annotations

#: Defines ``window.hoverlay_live(name)``: the model of that name reachable from the document's
#: roots. After a layout change BokehJS keeps the replaced models in its registry until a delayed
#: recompute, so ``get_model_by_name`` can find two ("Multiple models are named ...").
LIVE_JS = """() => {
    if (window.hoverlay_live !== undefined) return;
    window.hoverlay_live = (name) => {
        const doc = Bokeh.documents[0];
        const named = [...doc.all_models].filter(m => m.name === name);
        if (named.length <= 1) return named[0] || null;
        const live = new Set();
        for (const root of doc.roots()) for (const m of root.references()) live.add(m);
        return named.find(m => live.has(m)) || null;
    };
}"""


def ensure_live(page) -> None:
    page.evaluate(LIVE_JS)


def model_data(page, name: str) -> dict:
    """Columns of a named ColumnDataSource in the browser's document (arrays as nested lists)."""
    ensure_live(page)
    return page.evaluate("""(name) => {
        const src = window.hoverlay_live(name);
        const out = {};
        for (const [k, v] of Object.entries(src.data)) {
            out[k] = Array.from(v, (e) => (e != null && e.shape !== undefined)
                                      ? {shape: Array.from(e.shape), values: Array.from(e)} : e);
        }
        return out;
    }""", name)
