"""A bounded S3 request: the HTTP session hoverlay gives s3fs (through ``config_kwargs``).

Two things made a request to a server that accepted connections and then stopped answering
(SIGSTOPped, a hung proxy or load balancer) wait far too long, measured here against a
stopped moto server with ``connect_timeout=read_timeout=1``:

- botocore puts ``Expect: 100-continue`` on every ``PutObject``/``UploadPart``, and aiohttp
  waits for the interim ``100 Continue`` *before* it sends the body, with no timeout armed
  (``read_timeout``, aiohttp's ``sock_read``, covers only reads of the response): a PUT still
  waited at 60 s. This session drops the header, so the body goes out at once and the
  response is read under ``read_timeout`` like any GET's. The cost: a server refusing an
  upload (auth, redirect) answers after the body was sent; hoverlay's objects are shards of
  a few MB at most.
- s3fs retries every call 5 times, and ``cat_file`` (every Zarr read) retries those calls 5
  times again: a GET gave up after 25 read timeouts (37 s here, 6 minutes with s3fs's
  default 15 s). This session therefore fails every request at once, with
  :class:`S3Unreachable` (which no retry layer retries), once the server has been *silent* —
  no answer at all, while requests timed out — for ``SILENT_TRIES`` timeouts. The next
  request after that tries the server again, so a long-lived process (a Dask worker, the
  explorer) recovers when the server does.

So a build whose S3 server stops answering fails after about
``SILENT_TRIES * max(connect_timeout, read_timeout)`` plus one timeout (:func:`request_bound`:
75 s with the defaults below, 5 s with 1 s timeouts), with one line naming the server.

Imported only when an ``s3://`` URL is opened (aiobotocore is the ``[s3]`` extra's).
"""

from __future__ import annotations

import time
from typing import Any

from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

#: timeouts in a row, of silence, after which requests fail at once (see the module)
SILENT_TRIES = 4


class S3Unreachable(OSError):  # noqa: N818 - reads as what happened, like FileNotFoundError
    """The S3 server has not answered for longer than the bound: requests fail without retries."""


class BoundedAIOHTTPSession(AIOHTTPSession):
    """aiobotocore's aiohttp session without ``Expect: 100-continue``, which gives up on a
    silent server after a bound (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        timeouts = [t for t in (self._timeout.sock_connect, self._timeout.sock_read) if t]
        self.give_up_after = SILENT_TRIES * max(timeouts, default=60.0)
        self._silent_since: float | None = None  # time.monotonic() the first unanswered request began

    async def send(self, request: Any) -> Any:
        request.headers.pop("Expect", None)
        silent_since = self._silent_since
        if silent_since is not None and time.monotonic() - silent_since > self.give_up_after:
            self._silent_since = None  # the next request tries the server again
            raise S3Unreachable(f"the S3 server at {_endpoint(request.url)} has not answered for "
                                f"{time.monotonic() - silent_since:.0f}s (its requests timed out and "
                                f"were retried); connect_timeout and read_timeout in --storage-options "
                                f"'{{\"config_kwargs\": {{...}}}}' set this bound")
        began = time.monotonic()
        try:
            response = await super().send(request)
        except (HTTPClientError, BotoConnectionError):  # timeouts, refused or dropped connections
            if self._silent_since is None or began < self._silent_since:
                self._silent_since = began
            raise
        self._silent_since = None  # any answer, even an error status, is the server alive
        return response


def _endpoint(url: str) -> str:
    scheme, _, rest = str(url).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def config_defaults() -> dict[str, Any]:
    """botocore ``Config`` keywords hoverlay gives every ``s3://`` filesystem it opens.

    s3fs's own timeouts (5 s to connect, 15 s between reads); botocore does not retry
    (``total_max_attempts: 1``) because s3fs already retries every call 5 times (with
    botocore's 5 legacy attempts as well, a hung request waited 25 read timeouts); the
    session of :class:`BoundedAIOHTTPSession`. Any key given in ``--storage-options
    '{"config_kwargs": {...}}'`` replaces its default.
    """
    return {"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts": 1},
            "http_session_cls": BoundedAIOHTTPSession}


def request_bound(config_kwargs: dict[str, Any]) -> float:
    """About how many seconds a build waits on a silent server under ``config_kwargs`` before
    it fails: ``SILENT_TRIES`` timeouts of silence, then the requests in flight end."""
    wait = max(float(config_kwargs.get("connect_timeout", 5)), float(config_kwargs.get("read_timeout", 15)))
    return (SILENT_TRIES + 1) * wait
