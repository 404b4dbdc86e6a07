"""Store and image locations: local paths, ``file://`` and any fsspec URL (``s3://``, ``gs://``…).

Every place that turns a location into a filesystem goes through :func:`filesystem`, so that a
URL whose filesystem package is missing is one :class:`~hoverlay.errors.MissingDependencyError`
naming the pip extra (``pip install hoverlay[s3]``), and an unknown scheme is an
:class:`~hoverlay.stores.errors.BadURLError`, never an ImportError or ValueError traceback.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.registry import known_implementations

from hoverlay.errors import MissingDependencyError

from .errors import BadURLError

#: URL scheme -> (package, hoverlay extra that installs it)
FILESYSTEM_EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
}


def normalize_url(url: str | os.PathLike[str]) -> str:
    """Local paths and ``file://`` URLs become absolute paths; other URLs pass through."""
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
        if text.startswith("localhost/"):
            text = text.removeprefix("localhost")
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


S3_SCHEMES = ("s3", "s3a")


def storage_options_for(url: str, storage_options: dict[str, Any] | None,
                        small_objects: bool = False) -> dict[str, Any] | None:
    """``storage_options`` with hoverlay's defaults for ``url``'s filesystem: for ``s3://``, the
    bounded timeouts and the HTTP session of :mod:`hoverlay.stores._s3` (requests to a server
    that stopped answering fail after about 75 s, instead of never for an upload and after 25
    read timeouts for a read). The user's keys win (``config_kwargs`` key by key).

    ``small_objects`` (a Zarr store's own files, the lock): ``max_concurrency=1``, because s3fs
    sizes every whole-object read with a HEAD first (and, for a missing key, a LIST too) when
    it may split it into concurrent range requests — on a store's zarr.json files and chunks
    that was 576 of a 12-image build's 1,383 requests. Index files and other big objects keep
    the concurrent reads.

    Applied wherever a store's filesystem is opened (:func:`filesystem`, ``open_root``, the
    lock), so the build, its workers, ``info``, ``check`` and ``serve`` all get it.
    """
    if scheme(url) not in S3_SCHEMES:
        return storage_options
    try:
        from ._s3 import config_defaults
    except ImportError:  # no s3fs: opening the URL says which extra to install
        return storage_options
    options = dict(storage_options or {})
    options["config_kwargs"] = {**config_defaults(), **(options.get("config_kwargs") or {})}
    if small_objects:
        options.setdefault("max_concurrency", 1)
    return options


def s3_config_defaults() -> dict[str, Any]:
    """The botocore ``config_kwargs`` hoverlay gives ``s3://`` stores (timeouts, retries, session)."""
    from ._s3 import config_defaults

    return config_defaults()


def s3_request_bound(config_kwargs: dict[str, Any]) -> float:
    """About how many seconds a request to a silent S3 server takes to fail with these settings."""
    from ._s3 import request_bound

    return request_bound(config_kwargs)


def filesystem(url: str, storage_options: dict[str, Any] | None = None,
               small_objects: bool = False) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``url``, with one-line errors for what users hit;
    hoverlay's defaults for the filesystem applied (:func:`storage_options_for`)."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options_for(url, storage_options, small_objects) or {}))
    except ImportError as exc:
        raise missing_filesystem(url) from exc
    except ValueError as exc:
        if "not known" in str(exc):  # fsspec: "Protocol not known: …"
            raise unknown_scheme(url) from None
        raise
    except TypeError as exc:  # storage options the filesystem does not take
        raise BadURLError(f"storage options {storage_options} do not fit {scheme(url)}:// "
                          f"URLs: {exc}") from None


def missing_filesystem(url: str) -> MissingDependencyError:
    """The message for a URL whose filesystem package is not installed."""
    s = scheme(url)
    if s in FILESYSTEM_EXTRAS:
        package, extra = FILESYSTEM_EXTRAS[s]
        return MissingDependencyError(f"{s}:// URLs need the package {package}, which is not "
                                      f"installed: pip install 'hoverlay[{extra}]'")
    known = known_implementations.get(s, {})
    hint = known.get("err") or f"install the fsspec implementation of {s}://"
    return MissingDependencyError(f"{s}:// URLs need a package that is not installed: {hint}")


def ensure_filesystem(url: str) -> None:
    """Fail early when the package behind ``url``'s scheme is missing (before any work)."""
    if is_local(url):
        return
    try:
        fsspec.get_filesystem_class(scheme(url))
    except ImportError as exc:
        raise missing_filesystem(url) from exc
    except ValueError:
        raise unknown_scheme(url) from None


def unknown_scheme(url: str) -> BadURLError:
    return BadURLError(f"unknown URL scheme {scheme(url)!r} in {url!r} (use a local path, "
                       f"file://, s3://, gs://, or another fsspec protocol)")
