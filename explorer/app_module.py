"""Entry point for ``HOVERLAY_STORE=path panel serve explorer/app_module.py``.

Several stores are separated by ``os.pathsep`` (':' on POSIX; fsspec URLs such as ``s3://b/x``
stay whole) or commas. Panel runs this file once per session; the store readers are shared
across sessions through ``pn.state.as_cached``, and each session follows new commits of its
store like under ``hoverlay serve`` (``HOVERLAY_RELOAD_INTERVAL`` seconds, default 2, 0: off).
``HOVERLAY_BROWSER_HOVER_BUDGET`` is ``--browser-hover-budget`` (e.g. ``32M``; 0: server path).
Server options (auth, prefix, processes, ``--liveness``) are ``panel serve``'s own flags.
"""

from __future__ import annotations

import os

import panel as pn

from hoverlay.explorer.options import browser_hover_budget
from hoverlay.explorer.reload import DEFAULT_INTERVAL
from hoverlay.explorer.serve import build_session, split_store_list
from hoverlay.explorer.session import show_session_error

pn.extension()
pn.config.exception_handler = show_session_error

_stores = split_store_list(os.environ.get("HOVERLAY_STORE", ""))
_interval = float(os.environ.get("HOVERLAY_RELOAD_INTERVAL", DEFAULT_INTERVAL))
_budget = os.environ.get("HOVERLAY_BROWSER_HOVER_BUDGET")
_options = {"browser_hover_budget": browser_hover_budget(_budget)} if _budget else {}
if _stores:
    build_session(_stores, _options, _interval).servable(title="hoverlay explorer")
else:
    pn.pane.Alert("Set the environment variable `HOVERLAY_STORE` to a store path, e.g. "
                  "`HOVERLAY_STORE=demo-store panel serve explorer/app_module.py`.",
                  alert_type="danger").servable(title="hoverlay explorer")
