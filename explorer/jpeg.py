"""JPEG as the explorer sends pictures to the browser: page tiles and top-k crops.

Quality 90 with chroma not subsampled (4:4:4): on photos indistinguishable from the pixels at
screen size, ~10× smaller than raw RGBA (a 224 px tile: ~20 kB instead of 200 kB) and ~1 ms to
encode with Pillow — a page's 16 tiles were 3.2 MB of its first message before.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image as PILImage

QUALITY = 90


def encode(image: PILImage.Image | np.ndarray) -> bytes:
    """JPEG bytes of a PIL image or of uint8 (H, W, 3) pixels (row 0 at the top)."""
    img = image if isinstance(image, PILImage.Image) else PILImage.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=QUALITY, subsampling=0)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    """JPEG bytes as a data URI for an ``<img>`` or an ``ImageURL`` glyph."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
