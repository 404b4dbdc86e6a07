"""Client-supplied text is shown as text (explorer.text.as_plain_markdown), checked with Panel's own
Markdown renderer: no tag, link or emphasis survives, and the visible text is unchanged."""

import html
import re

import pytest

from hoverlay.explorer.text import as_plain_markdown


@pytest.mark.parametrize("text", [
    '<img src=x onerror="alert(1)">', "[x](javascript:alert(1))", "<details open ontoggle=alert(1)>",
    "**bold** _it_ `code` # head", "unknown layer '<b>x</b>'; this store has ['a', 'b']",
    "http://example.com/?a=1&b=2", "back\\slash", "",
])
def test_rendered_markdown_shows_exactly_the_text(text):
    import panel as pn

    pane = pn.pane.Alert(as_plain_markdown(text))  # the message box's own renderer (markdown-it)
    rendered = html.unescape(pane._transform_object(pane.object)["object"]).strip()  # as sent to the page
    assert not re.search(r"<(?!/?p>)", rendered), rendered  # no element but the paragraph
    visible = html.unescape(re.sub(r"</?p>", "", rendered))
    assert visible == text
