"""Image decoding and preprocessing: bytes -> RGB uint8 (S, S, 3) -> model input tensor.

Decoding is defensive because datasets are messy: EXIF orientation is applied, every mode
(L, LA, P, RGBA, CMYK, I;16, F) becomes RGB, and decompression bombs are refused with a
clear reason instead of exhausting memory.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

from .options import MAX_PIXELS


class ImageDecodeError(ValueError):
    """A file that cannot be turned into an RGB image; the message is the reason recorded."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB PIL image (EXIF-rotated), or raise :class:`ImageDecodeError`."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"image too large: {w}x{h} = {w * h} pixels > {max_pixels} "
                                       f"(possible decompression bomb)")
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb refused: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
    with contextlib.suppress(Exception):  # broken EXIF must not lose an otherwise fine image
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; 16-bit and float images are rescaled to their own range."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bicubic), then centre-crop to ``size``×``size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, math.ceil(w * scale - 1e-6)), max(size, math.ceil(h * scale - 1e-6))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_pixels(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> the exact uint8 (S, S, 3) model input that the store keeps for display."""
    return resize_center_crop(decode_image(data, max_pixels), size)
