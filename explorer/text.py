"""Showing text that may come from a client (a URL value, a widget value) or from data.

Every Markdown pane renders HTML, so a URL value echoed into a message —
``?layer=<img src=x onerror=…>`` — would run as script in the page (and, behind a login, with
the user's session). :func:`as_plain_markdown` turns any text into Markdown that displays
exactly that text: HTML special characters become entities and Markdown punctuation is
backslash-escaped, so neither tags nor links (``[x](javascript:…)``) nor emphasis survive.
"""

from __future__ import annotations

import re

#: ASCII punctuation Markdown gives a meaning (CommonMark lets a backslash escape any of it);
#: ``&``, ``<`` and ``>`` become entities instead, after this, so entities stay intact.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:\"'=])")


def as_plain_markdown(text: object) -> str:
    """Markdown source that renders as exactly ``str(text)``, nothing interpreted."""
    escaped = _MARKDOWN_PUNCTUATION.sub(r"\\\1", str(text))
    return escaped.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def client_message(exc: BaseException) -> str:
    """What a browser is told about a failure: damage to the store is reported without server
    paths (the server log has the full message, with the files)."""
    from hoverlay.stores.errors import CorruptStoreError

    if isinstance(exc, CorruptStoreError):
        return ("some images of this store are damaged: their vectors cannot be read (the server "
                "log names the images and files)")
    return str(exc)
