"""Finding input images: a folder, a glob, a list file, explicit paths, or fsspec URLs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from hoverlay.stores import filesystem

from .errors import SourceError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


@dataclass(frozen=True)
class ImageSource:
    uri: str     # local absolute path or fsspec URL
    label: str   # parent folder name below the source folder: class folders become labels
    #: path relative to the source folder (or glob root); the URI for listed files
    relative: str = ""


@dataclass
class Discovery:
    images: list[ImageSource]
    ignored: list[str]  # files skipped for their extension (README.txt, .DS_Store, …)


def _label(uri: str) -> str:
    parent = uri.rstrip("/").rsplit("/", 2)
    return parent[-2] if len(parent) >= 2 else ""


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def discover(src: str | os.PathLike[str] | Sequence[str],
             storage_options: dict[str, Any] | None = None) -> Discovery:
    """Expand SRC into a sorted, de-duplicated list of image files.

    Folders are walked recursively; hidden files and files without an image extension are
    ignored (and listed, so the summary can say so). A ``.txt``/``.lst`` file is a list of
    paths or URLs, one per line. Sorting makes row order deterministic across runs.
    """
    opts = storage_options or {}
    if isinstance(src, (list, tuple)):
        found: dict[str, ImageSource] = {}
        ignored: list[str] = []
        for item in src:
            d = discover(item, storage_options)
            for image in d.images:
                found.setdefault(image.uri, image)
            ignored += d.ignored
        return Discovery([found[u] for u in sorted(found)], ignored)
    text = os.fspath(src)  # type: ignore[arg-type]
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
    prefix = _protocol_prefix(text)
    fs, path = filesystem(text, opts)
    candidates: list[str]
    root: str | None = None  # the source folder: labels and relative paths start below it
    if any(ch in path for ch in "*?["):
        candidates = sorted(fs.glob(path))
        candidates = [c for c in candidates if fs.isfile(c)]
        root = path[:min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        candidates = sorted(fs.find(path))
        root = path.rstrip("/")
    elif fs.isfile(path):
        if os.path.splitext(path)[1].lower() in LIST_EXTENSIONS:
            lines = fs.cat_file(path).decode().splitlines()
            entries = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            base = os.path.dirname(text) if not prefix else text.rsplit("/", 1)[0]
            resolved = [e if ("://" in e or os.path.isabs(e)) else os.path.join(base, e) for e in entries]
            return discover(resolved, storage_options) if resolved else Discovery([], [])
        candidates = [path]
    else:
        raise SourceError(f"image source {text!r} does not exist (not a file, folder or matching glob)")
    images, ignored = [], []
    for c in candidates:
        name = c.rsplit("/", 1)[-1]
        uri = prefix + c if prefix and not c.startswith(prefix) else c
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            ignored.append(uri)
        elif root is not None and c.startswith(root + "/"):
            relative = c[len(root) + 1:]
            label = relative.rsplit("/", 2)[-2] if "/" in relative else ""  # directly in it: none
            images.append(ImageSource(uri, label, relative))
        else:
            images.append(ImageSource(uri, _label(uri), uri))
    return Discovery(images, ignored)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """All bytes of one file (local or fsspec URL)."""
    if "://" not in uri:
        with open(uri, "rb") as f:
            return f.read()
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()  # type: ignore[no-any-return]


def content_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_source(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """(content hash, error) for one file; unreadable files hash by their uri so they are recorded once."""
    try:
        return content_hash(read_bytes(uri, storage_options)), ""
    except OSError as exc:
        return "unreadable:" + hashlib.sha256(uri.encode()).hexdigest(), f"cannot read file: {exc}"
