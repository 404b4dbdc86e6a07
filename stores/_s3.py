"""A bounded S3 request: the HTTP session hoverlay gives s3fs (through ``config_kwargs``).

Why: botocore puts ``Expect: 100-continue`` on every ``PutObject``/``UploadPart``, and aiohttp
waits for the interim ``100 Continue`` *before* it sends the body with no timeout armed —
``read_timeout`` (aiohttp's ``sock_read``) only covers reads of the response. A server that
accepted the connection and then stopped answering (SIGSTOPped, a hung proxy, a dead load
balancer) therefore leaves an upload waiting forever, through every retry layer. Measured
here against a stopped moto server: a GET failed after its read timeouts, a PUT still waited
at 60 s with ``read_timeout=1``.

This session drops the header, so the body goes out at once and the response is read under
``read_timeout`` like any GET: every request is bounded by ``connect_timeout`` +
``read_timeout`` of silence. The cost of dropping the header is only that a server refusing
an upload (auth, redirect) answers after the body was sent; hoverlay's objects are shards of
a few MB at most.

Imported only when an ``s3://`` URL is opened (aiobotocore is the ``[s3]`` extra's).
"""

from __future__ import annotations

from typing import Any

from aiobotocore.httpsession import AIOHTTPSession


class BoundedAIOHTTPSession(AIOHTTPSession):
    """aiobotocore's aiohttp session, without ``Expect: 100-continue`` (see the module)."""

    async def send(self, request: Any) -> Any:
        request.headers.pop("Expect", None)
        return await super().send(request)


#: s3fs's own tries of every request (its ``retries`` class attribute; not a storage option).
S3FS_TRIES = 5


def config_defaults() -> dict[str, Any]:
    """botocore ``Config`` keywords hoverlay gives every ``s3://`` filesystem it opens.

    The bound on one request to a silent server is about
    ``S3FS_TRIES * total_max_attempts * (connect_timeout or read_timeout)`` plus s3fs's short
    back-offs (2 s in all): 5 * 1 * 15 s, about 77 s, with these defaults. botocore itself does
    not retry (``total_max_attempts: 1``) because s3fs already retries every call 5 times —
    together with botocore's own 5 legacy attempts a hung request waited 25 read timeouts.
    Any key given in ``--storage-options '{"config_kwargs": {...}}'`` replaces the default.
    """
    return {"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts": 1},
            "http_session_cls": BoundedAIOHTTPSession}


def request_bound(config_kwargs: dict[str, Any]) -> float:
    """Seconds one request to a silent server is retried for, under ``config_kwargs`` (for messages)."""
    retries = config_kwargs.get("retries") or {}
    attempts = int(retries.get("total_max_attempts") or (int(retries.get("max_attempts", 4)) + 1))
    wait = max(float(config_kwargs.get("connect_timeout", 5)), float(config_kwargs.get("read_timeout", 15)))
    return S3FS_TRIES * attempts * wait + 2
