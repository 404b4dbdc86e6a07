"""The whole view in the address bar: the URL mirrors the state, and an edited URL is applied.

Panel's location sync writes URL values into :class:`UrlState`, whose parameters take any value;
the state validates them (:meth:`ExplorerState.apply_url`), so a bad URL value is a message,
never an exception inside param.
"""

from __future__ import annotations

import json
from typing import Any

import param

from .state import URL_PARAMETERS, ExplorerState, same_value


class UrlState(param.Parameterized):
    """The view as the URL holds it, between Panel's location sync and the state.

    Its parameters take any value, so that whatever a URL holds reaches
    :meth:`ExplorerState.apply_url` (validation, one message for all bad values) instead of failing
    inside param; and the state applies a changed URL in one step, so that no value's reaction
    undoes another's (a label filter resetting the page to 1).
    """

    def __init__(self, **params: Any):
        for name in URL_PARAMETERS:
            self.param.add_parameter(name, param.Parameter(default=None))
        super().__init__(**params)
        self._state: ExplorerState | None = None
        self._location: Any = None
        self._opened: dict[str, Any] | None = None
        self._writing = False

    def values(self) -> dict[str, Any]:
        """The URL's values by app parameter name (None: not in the URL)."""
        return {name: getattr(self, name) for name in URL_PARAMETERS}

    def follow(self, state: ExplorerState, location: Any) -> None:
        """Mirror the state from now on, and hand URL changes to it."""
        self._state, self._location = state, location
        self._opened = self.values()  # the address the page was opened with
        self._write(state)
        state.param.watch(lambda *e: self._write(state), list(URL_PARAMETERS))
        self.param.watch(self._read, list(URL_PARAMETERS))

    def publish(self) -> None:
        """Write the whole view into the address bar (once the page is connected)."""
        if self._state is None or self._location is None:
            return
        query = {}
        for name, key in URL_PARAMETERS.items():
            value = getattr(self._state, name)
            query[key] = value if isinstance(value, str) else json.dumps(value)
        self._writing = True
        try:
            self._location.update_query(**query)
        finally:
            self._writing = False

    def _write(self, state: ExplorerState) -> None:
        self._writing = True
        try:
            self.param.update(**{name: getattr(state, name) for name in URL_PARAMETERS})
        finally:
            self._writing = False

    def _read(self, *events: param.parameterized.Event) -> None:
        if self._writing or self._state is None:
            return
        values = {e.name: e.new for e in events}
        opened, self._opened = self._opened, None
        if opened is not None and all(same_value(v, opened.get(k)) for k, v in values.items()):
            # the page reporting the address it was opened with, after the app already applied
            # (and corrected) it: write the view back instead of applying it a second time
            self.publish()
            return
        self._state.apply_url(values)
