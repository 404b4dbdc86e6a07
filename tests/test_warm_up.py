"""The server builds one page for nobody before it listens (``explorer.serve.warm_up``).

What it saves is a timing (the first page's build, ~1.0 s -> ~0.4 s on the 2-core machine), not
tested here; here: it builds a real page, leaves nothing a session would see, and a page that
cannot be built is left to the session without an error.
"""

from __future__ import annotations

import logging

import pytest

from hoverlay.stores import LayerGeometry
from hoverlay.stores.synthetic import make_synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("warm") / "s")
    make_synthetic_store(url, 20, layers={"a": LayerGeometry(4, 4, 8), "b": LayerGeometry(2, 2, 8)},
                         image_size=16, chunk=8)
    return url


def test_warm_up_builds_the_page_and_a_session_after_it_starts_fresh(store, caplog, monkeypatch):
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    from hoverlay.explorer import app as app_module
    from hoverlay.explorer import serve

    built: list = []
    real = app_module.create_app

    def recording(*args, **kw):
        layout = real(*args, **kw)
        built.append(layout)
        return layout

    monkeypatch.setattr(app_module, "create_app", recording)
    with caplog.at_level(logging.INFO, logger="hoverlay.explorer.serve"):
        serve.warm_up([store], {"page_size": 4})
    assert "failed" not in caplog.text
    (warm,) = built
    assert warm.app.state.page_size == 4 and len(warm.app.grid.shared.rgb.data["image"]) == 4  # a whole page
    first = warm.app.state.page
    warm.app.state.page = first + 2  # nothing of the warm-up page leaks into a session's
    doc = Document()
    with set_curdoc(doc):
        session = real([store], page_size=4)
        session.server_doc(doc)
    assert session.app.state.page == first and session.app.state is not warm.app.state
    assert session.app.grid.shared.rgb is not warm.app.grid.shared.rgb


def test_a_page_that_cannot_be_built_is_left_to_the_session(store, caplog):
    from hoverlay.explorer import serve

    with caplog.at_level(logging.INFO, logger="hoverlay.explorer.serve"):
        serve.warm_up([store], {"page_size": -3})  # no exception: the session shows the message
    assert "warming up a session of" in caplog.text and "page_size" in caplog.text


def test_warm_up_reports_a_page_that_fails_bokehs_integrity_check(store, caplog, monkeypatch):
    """Sessions skip Bokeh's per-document check (``skip_session_validation``); the warm-up page
    runs it once per start, so a page the app builds wrong still says so in the log."""
    import panel as pn
    from bokeh.models import ColumnDataSource, Plot, Scatter

    from hoverlay.explorer import app as app_module
    from hoverlay.explorer import serve

    def broken(*args, **kw):
        plot = Plot()
        plot.add_glyph(ColumnDataSource({"x": [1]}), Scatter(x="x", y="no_such_column"))
        return pn.pane.Bokeh(plot)

    monkeypatch.setattr(app_module, "create_app", broken)
    with caplog.at_level(logging.ERROR, logger="hoverlay.explorer.serve"):
        serve.warm_up([store], {})
    assert "integrity check" in caplog.text and "no_such_column" in caplog.text


def test_sessions_skip_bokehs_document_check_unless_the_environment_asks_for_it(monkeypatch):
    from bokeh.settings import settings

    from hoverlay.explorer import serve

    try:
        monkeypatch.delenv("BOKEH_VALIDATE_DOC", raising=False)
        serve.skip_session_validation()
        assert settings.perform_document_validation() is False
        settings.perform_document_validation.unset_value()
        monkeypatch.setenv("BOKEH_VALIDATE_DOC", "true")
        serve.skip_session_validation()
        assert settings.perform_document_validation() is True
    finally:
        settings.perform_document_validation.unset_value()
