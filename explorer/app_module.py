"""Entry point for ``HOVERLAY_STORE=path panel serve explorer/app_module.py``.

Several stores can be given separated by commas. Panel runs this file once per session; the
store readers are shared across sessions through ``pn.state.as_cached``.
"""

from __future__ import annotations

import os

import panel as pn

from explorer.app import create_app

pn.extension()

_stores = [s.strip() for s in os.environ.get("HOVERLAY_STORE", "").split(",") if s.strip()]
if _stores:
    create_app(_stores).servable(title="hoverlay explorer")
else:
    pn.pane.Alert("Set the environment variable `HOVERLAY_STORE` to a store path, e.g. "
                  "`HOVERLAY_STORE=demo-store panel serve explorer/app_module.py`.",
                  alert_type="danger").servable(title="hoverlay explorer")
