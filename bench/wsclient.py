"""A headless Bokeh-protocol client: what a browser tab does to the explorer, minus the browser.

Load tests need many sessions at once, and 20 Chromium pages do not fit two CPU cores; the
server cannot tell the difference, because all it sees of a page is a websocket speaking the
Bokeh protocol. This client does exactly what the page's JavaScript does on the hover path:
GET the page (which creates the server session), open ``/ws`` with the session token, pull the
document, then write the ``grid-pointer`` source the way :mod:`explorer.js` does, and time the
``PATCH-DOC`` that carries the new overlays back. Widgets are driven the same way (a
``ModelChanged`` of their ``value``), so malformed input reaches the server exactly as a hand-
crafted websocket message would.

It keeps its own copy of every model's attributes (decoded, buffers as numpy arrays), updated
from the server's patches, so tests can read what a browser would display.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any

import numpy as np
from bokeh.core.serialization import Serializer
from bokeh.protocol import Protocol
from bokeh.protocol.receiver import Receiver
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

TOKEN = re.compile(r'"token":\s*"([^"]+)"')
_ids = itertools.count()


class SessionRefused(RuntimeError):
    """The server gave no session: an HTTP error, a redirect (login), or a refused websocket."""


@dataclass
class Model:
    """A model of the client's document copy: type name and decoded attributes."""

    id: str
    type: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str | None:
        return self.attributes.get("name")


@dataclass
class Update:
    """One server ``PATCH-DOC``: when it arrived and which model ids it touched."""

    time: float
    models: set[str]


class Decoder:
    """Just enough of Bokeh's deserialiser to keep a readable copy of the document."""

    def __init__(self, models: dict[str, Model], buffers: dict[str, bytes]):
        self.models = models
        self.buffers = buffers

    def __call__(self, rep: Any) -> Any:
        if isinstance(rep, list):
            return [self(v) for v in rep]
        if not isinstance(rep, dict):
            return rep
        kind = rep.get("type")
        if kind == "map":
            return {self(k): self(v) for k, v in rep.get("entries", [])}
        if kind == "object" and "id" in rep:
            model = self.models.get(rep["id"])
            if model is None:
                model = self.models[rep["id"]] = Model(rep["id"], rep.get("name", "?"))
            if "attributes" in rep:
                model.attributes.update({k: self(v) for k, v in rep["attributes"].items()})
            return model
        if kind in ("ndarray", "typed_array"):
            data = self._bytes(rep["array"])
            arr = np.frombuffer(data, dtype=np.dtype(rep["dtype"]).newbyteorder(
                "<" if rep.get("order", "little") == "little" else ">"))
            return arr.reshape(rep["shape"]) if "shape" in rep else arr
        if kind == "bytes":
            return self._bytes(rep)
        if kind in ("number", "symbol", "slice", "set", "value", "field", "expr"):
            return rep.get("value", rep)
        if kind is None and "id" in rep and len(rep) == 1:
            return self.models.get(rep["id"], rep["id"])
        return {k: self(v) for k, v in rep.items()}

    def _bytes(self, rep: dict[str, Any]) -> bytes:
        data = rep.get("data", rep)
        if isinstance(data, dict) and "id" in data:
            return self.buffers[data["id"]]
        return base64.b64decode(data)


class BokehSession:
    """One server session driven over its websocket (see the module docstring)."""

    def __init__(self, base_url: str, ws: WebSocketClientConnection, token: str):
        self.base_url = base_url
        self.ws = ws
        self.token = token
        self.models: dict[str, Model] = {}
        self.updates: list[Update] = []
        self.replies: dict[str, Any] = {}
        self.closed = False
        self._receiver = Receiver(Protocol())
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    async def open(cls, base_url: str, query: str = "", cookies: dict[str, str] | None = None,
                   origin: str | None = None, timeout: float = 60.0) -> BokehSession:
        """GET ``base_url + query`` like a browser, connect the session's websocket, pull the doc."""
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())} if cookies else {}
        try:
            resp = await AsyncHTTPClient().fetch(HTTPRequest(base_url + query, headers=headers,
                                                             follow_redirects=False,
                                                             request_timeout=timeout))
        except HTTPClientError as exc:
            raise SessionRefused(f"GET {base_url + query}: HTTP {exc.code}") from exc
        match = TOKEN.search(resp.body.decode(errors="replace"))
        if match is None:
            raise SessionRefused(f"GET {base_url + query}: no session token in the page")
        return await cls.connect(base_url, match.group(1), cookies=cookies, origin=origin, timeout=timeout)

    @classmethod
    async def connect(cls, base_url: str, token: str, cookies: dict[str, str] | None = None,
                      origin: str | None = None, timeout: float = 60.0) -> BokehSession:
        """Open ``/ws`` with a session token (as the page's script does) and pull the document."""
        ws_url = re.sub(r"^http", "ws", base_url.split("?")[0].rstrip("/")) + "/ws"
        headers = {"Origin": origin or re.sub(r"^(https?://[^/]+).*$", r"\1", base_url)}
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        try:
            ws = await websocket_connect(HTTPRequest(ws_url, headers=headers, request_timeout=timeout),
                                         subprotocols=["bokeh", token], max_message_size=256 * 2**20)
        except (HTTPClientError, OSError) as exc:
            raise SessionRefused(f"websocket {ws_url} refused: {exc}") from exc
        stream = getattr(getattr(ws, "protocol", None), "stream", None)
        if stream is not None:  # like a browser: no Nagle delay between a message's frames
            stream.set_nodelay(True)
        self = cls(base_url, ws, token)
        ack = await asyncio.wait_for(self._read(), timeout)
        if ack is None or ack.msgtype != "ACK":
            ws.close()
            raise SessionRefused(f"websocket {ws_url}: no ACK ({ack and ack.msgtype})")
        self._send("PULL-DOC-REQ", {})
        reply = await asyncio.wait_for(self._read(), timeout)
        if reply is None or reply.msgtype != "PULL-DOC-REPLY":
            ws.close()
            raise SessionRefused(f"websocket {ws_url}: no document ({reply and reply.msgtype})")
        decode = Decoder(self.models, {b.id: b.data for b in reply.buffers})
        doc = reply.content["doc"]
        for rep in doc.get("defs", []):
            decode(rep)
        for root in doc["roots"]:
            decode(root)
        self._reader = asyncio.ensure_future(self._read_loop())
        self.ready()
        return self

    def ready(self) -> None:
        """Announce ``document_ready`` as BokehJS does once the page is rendered: Panel holds
        back model updates made inside ``pn.io.hold`` and runs ``onload`` callbacks only then."""
        self._send("PATCH-DOC", {"events": [{"kind": "MessageSent", "msg_type": "bokeh_event", "msg_data": {
            "type": "event", "name": "document_ready", "values": {"type": "map"}}}]})

    async def close(self) -> None:
        self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # closing anyway
                await self._reader

    # ---------------------------------------------------------------- wire
    def _send(self, msgtype: str, content: dict[str, Any]) -> str:
        msgid = f"c{next(_ids)}"
        self.ws.write_message(json.dumps({"msgid": msgid, "msgtype": msgtype}))
        self.ws.write_message("{}")
        self.ws.write_message(json.dumps(content))
        return msgid

    async def _read(self) -> Any:
        while True:
            fragment = await self.ws.read_message()
            if fragment is None:
                self.closed = True
                return None
            message = await self._receiver.consume(fragment)
            if message is not None:
                return message

    async def _read_loop(self) -> None:
        while True:
            message = await self._read()
            if message is None:
                async with self._changed:
                    self._changed.notify_all()
                return
            if message.msgtype == "PATCH-DOC":
                touched = self._apply(message)
                self.updates.append(Update(time.perf_counter(), touched))
            else:
                self.replies[message.header.get("reqid", "")] = message
            async with self._changed:
                self._changed.notify_all()

    def _apply(self, message: Any) -> set[str]:
        decode = Decoder(self.models, {b.id: b.data for b in message.buffers})
        touched: set[str] = set()
        for ref in message.content.get("references", []):
            decode(ref)
        for event in message.content.get("events", []):
            model = event.get("model")
            mid = model.get("id") if isinstance(model, dict) else None
            if mid is None:
                continue
            touched.add(mid)
            target = self.models.setdefault(mid, Model(mid, "?"))
            kind = event.get("kind")
            if kind == "ModelChanged":
                target.attributes[event["attr"]] = decode(event["new"])
            elif kind == "ColumnDataChanged":
                data = dict(target.attributes.get(event.get("attr", "data")) or {})
                data.update(decode(event["data"]))
                target.attributes[event.get("attr", "data")] = data
            elif kind in ("ColumnsStreamed", "ColumnsPatched"):
                target.attributes.setdefault("_stale", True)  # not needed by the explorer's tests
        return touched

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until ``predicate()`` holds on the document copy (checked after every message)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate() or self.closed), timeout)
        if not predicate():
            raise ConnectionError("the server closed the session")

    # ---------------------------------------------------------------- document
    def by_name(self, name: str) -> Model:
        """The newest model of that name (a rebuilt view replaces its models with new ones)."""
        for m in reversed(list(self.models.values())):
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}")

    def named(self, prefix: str) -> dict[str, Model]:
        """Newest model of each name starting with ``prefix``, by name."""
        return {m.name: m for m in self.models.values() if (m.name or "").startswith(prefix)}

    def find(self, predicate: Callable[[Model], bool]) -> Iterator[Model]:
        return (m for m in self.models.values() if predicate(m))

    def widget(self, title: str) -> Model:
        """A widget by its label (Panel widgets render ``name`` as the Bokeh ``title``)."""
        for m in reversed(list(self.models.values())):
            if str(m.attributes.get("title", "")).strip() == title and "value" in m.attributes:
                return m
        raise KeyError(f"no widget titled {title!r}")

    def texts(self) -> str:
        """Every ``text`` attribute of the document: what the page shows as prose."""
        return "\n".join(str(m.attributes["text"]) for m in self.models.values()
                         if isinstance(m.attributes.get("text"), str))

    def message(self) -> str:
        """The app's message banner (``.hoverlay-message``), '' while hidden."""
        for m in self.models.values():
            classes = m.attributes.get("css_classes") or []
            if "hoverlay-message" in classes:
                text = str(m.attributes.get("text", "")) if m.attributes.get("visible", True) else ""
                return html.unescape(html.unescape(text))  # Panel escapes the markup, then its text
        return ""

    def change(self, model: Model | str, attr: str, value: Any) -> str:
        """Send a ``ModelChanged`` (what a browser sends when a widget or source changes)."""
        mid = model.id if isinstance(model, Model) else model
        rep = Serializer().encode(value)
        self.models.setdefault(mid, Model(mid, "?")).attributes[attr] = value
        return self._send("PATCH-DOC", {"events": [{"kind": "ModelChanged", "model": {"id": mid},
                                                    "attr": attr, "new": rep}]})

    def click(self, model: Model | str) -> str:
        """Press a button (the ``button_click`` event BokehJS sends)."""
        mid = model.id if isinstance(model, Model) else model
        return self._send("PATCH-DOC", {"events": [{"kind": "MessageSent", "msg_type": "bokeh_event", "msg_data": {
            "type": "event", "name": "button_click",
            "values": {"type": "map", "entries": [["model", {"id": mid}]]}}}]})

    def button(self, label: str) -> Model:
        for m in self.models.values():
            if str(m.attributes.get("label", "")).strip() == label and m.type.endswith("Button"):
                return m
        raise KeyError(f"no button labelled {label!r}")

    # ---------------------------------------------------------------- the hover path
    def pointer(self, tile: int, y: int, x: int, click: int = 0, layers: list[str] | None = None,
                drawn: int = 0) -> str:
        """Write the pointer source as :mod:`explorer.js` does after a move to (tile, y, x);
        ``drawn`` 1 as a browser-path page's rest does (it drew the maps and keeps the query)."""
        figs = layers or [name.split(":", 1)[1] for name in self.named("grid-overlay:")]
        n = len(figs)
        data = {"fig": figs, "tile": [tile] * n, "y": [y] * n, "x": [x] * n, "cx": [0.0] * n,
                "cy": [0.0] * n, "w": [1.0] * n, "h": [1.0] * n, "click": [click] * n, "drawn": [drawn] * n}
        return self.change(self.by_name("grid-pointer"), "data", data)

    def overlay_ids(self) -> set[str]:
        return {m.id for m in self.named("grid-overlay:").values()}

    async def hover(self, tile: int, y: int, x: int, timeout: float = 10.0) -> float:
        """Move to a patch and wait for the overlays: seconds from sending to receiving them."""
        ids = self.overlay_ids()
        seen = len(self.updates)
        t0 = time.perf_counter()
        self.pointer(tile, y, x)
        await self.wait_for(lambda: any(u.models & ids for u in self.updates[seen:]), timeout)
        first = next(u for u in self.updates[seen:] if u.models & ids)
        return first.time - t0

    def overlay(self, layer: str) -> np.ndarray:
        """The overlay mosaic of a layer as the client holds it (Bokeh row 0 at the bottom)."""
        data = self.by_name(f"grid-overlay:{layer}").attributes["data"]
        return np.asarray(data["image"][0])

    def tile_maps(self, layer: str, image_size: int) -> np.ndarray:
        """Per-tile similarity maps (n, H, W) cut out of the layer's mosaic where the tiles are
        drawn (the same cut as the browser tests make from BokehJS's document)."""
        data = self.by_name(f"grid-overlay:{layer}").attributes["data"]
        rgb = self.by_name("grid-rgb").attributes["data"]
        mosaic = np.asarray(data["image"][0], np.float32)[::-1]
        rows, cols = mosaic.shape
        dw, dh = float(np.ravel(data["dw"])[0]), float(np.ravel(data["dh"])[0])
        cell_w, cell_h = dw / cols, dh / rows
        h, w = round(image_size / cell_h), round(image_size / cell_w)
        out = []
        for x0, y0 in zip(np.ravel(rgb[f"x:{layer}"]), np.ravel(rgb[f"y:{layer}"]), strict=True):
            c0, r0 = round(x0 / cell_w), round((dh - y0 - image_size) / cell_h)
            out.append(mosaic[r0:r0 + h, c0:c0 + w])
        return np.stack(out) if out else np.empty((0, h, w), np.float32)

    def page_image_ids(self) -> list[int]:
        """Image ids of the page's tiles, from their captions ('#12 label')."""
        return [int(str(t).split()[0][1:]) for t in self.by_name("grid-labels").attributes["data"]["text"]]


def parse_cookies(headers: Any) -> dict[str, str]:
    """``Set-Cookie`` headers of a tornado response -> {name: value}."""
    jar: dict[str, str] = {}
    for raw in headers.get_list("Set-Cookie"):
        c: SimpleCookie = SimpleCookie()
        c.load(raw)
        jar.update({k: v.value for k, v in c.items()})
    return jar
