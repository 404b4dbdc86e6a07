"""The explorer's model worker: ``python -m hoverlay.pipeline.query_worker``.

The explorer never imports torch (its memory, start time and the fork of ``--num-procs`` would
all pay for it, and ``pip install hoverlay`` has no torch). Embedding an uploaded image
therefore runs here, in one child process per server process, started by
:class:`hoverlay.explorer.query_worker.QueryWorker`, which talks to it with the framed messages
of :mod:`hoverlay.stores.query_wire` over this process's stdin and a private copy of its stdout
(stdout itself is pointed at stderr, so a library that prints cannot corrupt a frame).

Requests are handled one at a time, in order (torch spreads one forward over the cores it is
given; two at once gain nothing). Each store's model is loaded once, on its first request (or a
``load``), and kept; a store whose model cannot be loaded here (weights missing, another
hoverlay) gets an answer saying so — remembered for :data:`FAILURE_TTL` seconds so that a burst
of uploads does not retry a slow failure — and the worker keeps serving other stores.

Requests (header fields; the image file is blob 0 of an ``embed``):

``{"op": "embed", "id": n, "store": url, "layers": [..] | null, "name": text, "deadline": t,
"storage_options": {..} | null, "max_bytes": n, "max_pixels": n, "validated": bool}``
    (``validated``: the client ran :func:`~hoverlay.stores.uploads.validate_upload` on these
    bytes, so the worker decodes once, as the build does, instead of twice)
    answered ``{"id": n, "ok": true, pixels/layers/model/timings}`` + the arrays of
    :func:`~hoverlay.stores.query_wire.encode_embedding`, or ``{"id": n, "ok": false, "kind": …,
    "message": …}`` with kind ``upload`` (and ``problem``), ``model``, ``store``, ``expired``
    (its ``deadline``, a ``time.monotonic()`` value — system-wide on Linux, macOS and Windows —
    passed before it was read) or ``internal``;
``{"op": "load", "id": n, "store": url, ...}``  loads the store's model (a warm-up);
``{"op": "ping", "id": n}``; ``{"op": "stop"}`` (or the end of stdin) ends the worker.

The first frame the worker writes is ``{"op": "ready", "pid": …, "import_seconds": …}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import IO, Any

from hoverlay.stores.query_wire import encode_embedding, read_message, write_message

log = logging.getLogger("hoverlay.query_worker")

#: Seconds a store whose model failed to load answers with that failure before trying again.
FAILURE_TTL = 30.0


class Worker:
    """The request loop, with its per-store model cache."""

    def __init__(self, out: IO[bytes], device: str = "cpu"):
        self.out = out
        self.device = device
        self.models: dict[str, Any] = {}           # cache key -> StoreModel
        self.failures: dict[str, tuple[float, str, str]] = {}  # key -> (when, kind, message)

    def answer(self, header: dict[str, Any], blobs: Sequence[Any] = ()) -> None:
        write_message(self.out, header, blobs)

    def model_for(self, store: str, storage_options: dict[str, Any] | None) -> tuple[Any, bool]:
        """(the store's :class:`~hoverlay.pipeline.query.StoreModel`, loaded once; whether this
        call loaded it)."""
        from hoverlay.stores import open_store

        from .query import load_store_model

        key = json.dumps([store, storage_options], sort_keys=True, default=str)
        cached = self.models.get(key)
        if cached is not None:
            return cached, False
        failed = self.failures.get(key)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_TTL:
            raise _Refusal(failed[1], failed[2])
        try:
            reader = open_store(store, storage_options=storage_options)
        except Exception as exc:
            self.failures[key] = (time.monotonic(), "store", str(exc))
            raise _Refusal("store", str(exc)) from None
        try:
            model = load_store_model(reader, device=self.device)
        except Exception as exc:  # WeightsError, ModelSpecError, StoreMismatchError, ImportError, …
            spec = reader.attrs.model.get("spec")
            message = f"the model of this store ({spec}) cannot be loaded here: {exc}"
            self.failures[key] = (time.monotonic(), "model", message)
            log.warning("%s", message)
            raise _Refusal("model", message) from None
        self.failures.pop(key, None)
        self.models[key] = model
        return model, True

    def handle(self, header: dict[str, Any], blobs: list[bytes]) -> None:
        op, rid = header.get("op"), header.get("id")
        if op == "ping":
            self.answer({"id": rid, "ok": True, "pid": os.getpid()})
            return
        if op not in ("embed", "load"):
            self.answer({"id": rid, "ok": False, "kind": "internal", "message": f"unknown op {op!r}"})
            return
        deadline = header.get("deadline")
        if isinstance(deadline, (int, float)) and time.monotonic() > deadline:
            self.answer({"id": rid, "ok": False, "kind": "expired", "message": "the request timed out "
                         "before the worker reached it"})
            return
        from hoverlay.stores.uploads import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, UploadError

        from .query import embed_image

        try:
            t = time.perf_counter()
            model, fresh = self.model_for(str(header["store"]), header.get("storage_options"))
            loaded = time.perf_counter() - t
            if op == "load":
                self.answer({"id": rid, "ok": True, "load_seconds": loaded, "layers": model.layers,
                             "size": model.size, "model": model.model})
                return
            if not blobs:
                raise _Refusal("internal", "an embed request without an image")
            layers = header.get("layers")
            image = embed_image(blobs[0], model, layers, name=str(header.get("name") or "the upload"),
                                max_bytes=int(header.get("max_bytes") or DEFAULT_MAX_BYTES),
                                max_pixels=int(header.get("max_pixels") or DEFAULT_MAX_PIXELS),
                                validated=bool(header.get("validated")))
            if fresh:
                image.timings["load"] = loaded
            fields, arrays = encode_embedding(image)
            self.answer({"id": rid, "ok": True, **fields}, arrays)
        except _Refusal as exc:
            self.answer({"id": rid, "ok": False, "kind": exc.kind, "message": exc.message})
        except UploadError as exc:
            self.answer({"id": rid, "ok": False, "kind": "upload", "problem": exc.problem,
                         "message": str(exc)})
        except Exception as exc:
            from hoverlay.errors import HoverlayError

            traceback.print_exc(file=sys.stderr)
            kind = "store" if isinstance(exc, HoverlayError) else "internal"
            self.answer({"id": rid, "ok": False, "kind": kind, "message": f"{type(exc).__name__}: {exc}"
                         if kind == "internal" else str(exc)})


class _Refusal(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hoverlay.pipeline.query_worker",
                                description="the explorer's model worker (speaks framed messages on "
                                            "stdin/stdout; not for interactive use)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    # frames go to a private copy of stdout; anything printed goes to stderr instead
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="query worker: %(levelname)s %(message)s")
    t = time.perf_counter()
    import torch

    from . import query  # noqa: F401  (the model code, imported before "ready")

    if args.threads:
        torch.set_num_threads(args.threads)
    worker = Worker(out, device=args.device)
    worker.answer({"op": "ready", "pid": os.getpid(), "import_seconds": time.perf_counter() - t,
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    stdin = sys.stdin.buffer
    while True:
        message = read_message(stdin)
        if message is None:
            return 0
        header, blobs = message
        if header.get("op") == "stop":
            return 0
        worker.handle(header, blobs)


if __name__ == "__main__":
    raise SystemExit(main())
