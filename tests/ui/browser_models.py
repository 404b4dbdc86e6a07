"""Helpers shared by the browser tests: reading Bokeh models from the page."""

from __future__ import annotations


def model_data(page, name: str) -> dict:
    """Columns of a named ColumnDataSource in the browser's document (arrays as nested lists)."""
    return page.evaluate("""(name) => {
        const src = Bokeh.documents[0].get_model_by_name(name);
        const out = {};
        for (const [k, v] of Object.entries(src.data)) {
            out[k] = Array.from(v, (e) => (e != null && e.shape !== undefined)
                                      ? {shape: Array.from(e.shape), values: Array.from(e)} : e);
        }
        return out;
    }""", name)
