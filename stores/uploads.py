"""Checking an image someone hands us (an upload, a query file) before anything uses it.

Why here: ``hoverlay query`` (the pipeline) and the explorer's upload panel must refuse exactly the
same files with exactly the same words, and the explorer process never imports torch or the
pipeline (tests/test_dependencies.py), so the one validator lives in ``stores`` — Pillow and the
standard library only, nothing written anywhere.

What is refused, each as an :class:`UploadError` whose ``problem`` names the case and whose message
is one line naming the file by the name the caller gives (a client's own file name, never a server
path):

- ``empty``: 0 bytes;
- ``too-large``: more bytes than ``max_bytes`` (checked before reading more than that from a path);
- ``not-an-image``: no format Pillow knows;
- ``bomb``: more pixels than ``max_pixels``, read from the header before any pixel is decoded (a
  decompression bomb: a 200-byte PNG can declare 10⁹ pixels), or one of Pillow's own bomb errors;
- ``truncated``: a known format whose pixel data ends early or is corrupt (decoded in full here,
  as the build decodes it, so a file that passes here decodes in the model worker too).

The pixel limit is explicit: the check compares the header's width × height with ``max_pixels``
itself rather than relying on Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` (which another
library may change, and which only *warns* below twice its value); Pillow's bomb warning is also
turned into a refusal while decoding.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from hoverlay.errors import InputError

#: Bytes an upload may have by default (a phone photo is 3-12 MB).
DEFAULT_MAX_BYTES = 32 * 2**20
#: Pixels an upload may have by default: the build's own limit
#: (``hoverlay.pipeline.options.MAX_PIXELS``; tests/test_query.py checks they agree).
DEFAULT_MAX_PIXELS = 64_000_000

#: The cases :class:`UploadError` names.
PROBLEMS = ("empty", "too-large", "not-an-image", "bomb", "truncated", "not-found")


class UploadError(InputError, ValueError):
    """An image that cannot be used as a query; ``problem`` is one of :data:`PROBLEMS`.

    The message is one line meant for the person who gave the file: it names the file by the
    name the caller passed (for a browser upload, the client's own file name) and says what to do.
    """

    def __init__(self, problem: str, message: str):
        super().__init__(message)
        self.problem = problem

    @property
    def public(self) -> str:
        """What a browser may be shown: the message itself (it never names a server path)."""
        return str(self)


@dataclass(frozen=True)
class UploadInfo:
    """What the header and a full decode said about an accepted image."""

    format: str       # Pillow's format name: PNG, JPEG, WEBP, …
    width: int
    height: int
    mode: str         # Pillow mode before conversion to RGB (L, RGBA, P, …)
    n_bytes: int


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def validate_upload(data: bytes | bytearray | memoryview, *, name: str = "the upload",
                    max_bytes: int = DEFAULT_MAX_BYTES,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> UploadInfo:
    """Check that ``data`` is one whole image within the limits, or raise :class:`UploadError`.

    Decodes the image in full (that is the only way to find a truncated one) but keeps nothing.
    ``name`` is how the message names the file; pass a client's file name, never a server path.
    Costs about a decode: ~1 ms for a 224-px PNG, ~1 s for a 60-megapixel photo.
    """
    label = _label(name)
    n = len(data)
    if n == 0:
        raise UploadError("empty", f"{label} is empty (0 bytes): choose an image file")
    if n > max_bytes:
        raise UploadError("too-large", f"{label} is {_size_text(n)}, over the {_size_text(max_bytes)} "
                                       f"limit for a query image: use a smaller file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            w, h = img.size
            if w * h > max_pixels:
                raise UploadError("bomb", f"{label} declares {w}x{h} = {w * h:,} pixels, over the "
                                          f"{max_pixels:,}-pixel limit (a decompression bomb, or a "
                                          f"very large image: scale it down first)")
            fmt, mode = str(img.format or "?"), str(img.mode)
            img.load()
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError("bomb", f"{label} decompresses to more pixels than allowed (a decompression "
                                  f"bomb, or a very large image: scale it down first)") from None
    except Image.UnidentifiedImageError:
        raise UploadError("not-an-image", f"{label} is not an image Pillow can read (PNG, JPEG, WebP, "
                                          f"TIFF, …): choose an image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "decompressed data too large" in str(exc).lower():  # PNG text/ICC chunk bombs
            raise UploadError("bomb", f"{label} holds a chunk that decompresses to too much data "
                                      f"(a decompression bomb)") from None
        raise UploadError("truncated", f"{label} is a truncated or corrupt {_format_of(data)} image "
                                       f"(its pixel data does not decode): upload the whole file "
                                       f"again") from None
    except MemoryError:
        raise UploadError("bomb", f"{label} needs more memory to decode than this server has") from None
    return UploadInfo(fmt, int(w), int(h), mode, n)


def read_upload(path: str | os.PathLike[str], *, name: str | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, UploadInfo]:
    """The bytes of a local image file and its :class:`UploadInfo`, or an :class:`UploadError`.

    Reads at most ``max_bytes + 1`` bytes, so a 50 GB file is refused without being read.
    ``name`` (default: the path) is how messages name it — the command line shows the user's own
    path; a server reading an allow-listed folder passes the path relative to that folder.
    """
    where = os.fspath(path)
    label = name if name is not None else where
    try:
        with open(where, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise UploadError("not-found", f"{_label(label)} does not exist") from None
    except IsADirectoryError:
        raise UploadError("not-an-image", f"{_label(label)} is a folder, not an image file") from None
    except PermissionError:
        raise UploadError("not-found", f"{_label(label)} cannot be read (permission denied)") from None
    return data, validate_upload(data, name=label, max_bytes=max_bytes, max_pixels=max_pixels)


def resolve_allowed_path(path: str, folders: Sequence[str | os.PathLike[str]]) -> str:
    """The real path of ``path`` if it lies inside one of ``folders`` (an allow-list), else an
    :class:`UploadError` that shows no server path.

    For the explorer's "path on the server" query: ``path`` is relative to an allowed folder (or
    absolute inside one); symbolic links and ``..`` are resolved first, so neither can leave the
    folder. An empty allow-list allows nothing.
    """
    text = str(path).strip()
    if not folders:
        raise UploadError("not-found", "reading query images from server folders is not enabled on "
                                       "this server (hoverlay serve --query-folder DIR)")
    if not text or "\x00" in text:
        raise UploadError("not-found", "no path given")
    for folder in folders:
        root = os.path.realpath(os.fspath(folder))
        candidate = os.path.realpath(text if os.path.isabs(text) else os.path.join(root, text))
        if os.path.commonpath([root, candidate]) == root and os.path.isfile(candidate):
            return candidate
    raise UploadError("not-found", f"{_label(os.path.basename(text) or text)} is not a file in the "
                                   f"folders this server allows")


def _label(name: str) -> str:
    """A file name as messages show it: quoted, one line, not absurdly long."""
    text = " ".join(str(name).split())
    if len(text) > 80:
        text = text[:38] + "…" + text[-38:]
    return repr(text) if text else "the upload"


def _format_of(data: bytes | bytearray | memoryview) -> str:
    """The format a file's magic bytes claim (for the truncation message)."""
    head = bytes(data[:12])
    for magic, fmt in ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                       (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")):
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return "image"
