"""Panel widget keywords that work across Panel 1.x.

Panel 1.9 renamed a widget's caption ``name`` -> ``label`` and a button's ``button_type`` ->
``color`` (the old names warn); the project supports Panel >= 1.4, where only the old names
exist. These helpers pick whichever the installed Panel has.
"""

from __future__ import annotations

from typing import Any

import panel as pn


def labelled(cls: type[pn.widgets.Widget], text: str) -> dict[str, str]:
    """``{"label": text}`` where the widget has a ``label`` caption, else ``{"name": text}``."""
    if "label" in cls.param and cls is not pn.widgets.FileDownload:
        return {"label": text}
    return {"name": text}


def colored(cls: type[pn.widgets.Widget], color: str) -> dict[str, str]:
    """``{"color": c}`` on Panel >= 1.9, else ``{"button_type": c}``."""
    return {"color": color} if "color" in cls.param else {"button_type": color}


def button(text: str, color: str = "default", **kw: Any) -> pn.widgets.Button:
    cls = pn.widgets.Button
    return cls(**labelled(cls, text), **colored(cls, color), **kw)
