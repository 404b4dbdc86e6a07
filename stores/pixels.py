"""How a store keeps its model-input pixels: an image codec per image chunk (format 3).

Since format version 3 each image's (S, S, 3) uint8 pixels are one JPEG, WebP or AVIF image
inside the shard (lossy at a chosen quality, or lossless), followed by a CRC32C, instead of
zstd-compressed raw bytes: the pixels were about half of a 3-layer store's bytes with zstd, and
a JPEG at quality 90 is ~8x smaller and ~2x faster to encode than zstd level 3.

The Zarr v3 codecs here are named and configured like the ``imagecodecs-zarr`` package's
(``imagecodecs_jpeg`` with ``level``/``lossless``, …), so a reader that has that package
(Python >= 3.12) decodes hoverlay's pixels too. Importing this module registers them with
zarr-python unless another implementation of the name is registered already (``import
hoverlay.stores`` does it, so every hoverlay reader and writer can open such a store).

The CRC32C after the image is what makes a damaged pixel chunk an error: libjpeg-turbo decodes
corrupt entropy data to garbage without a word (seen: 8 zeroed bytes anywhere in a JPEG).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

#: The pixel codecs a store may use: the image codecs, and format 2's zstd on raw bytes (the
#: one a Zarr v3 reader without hoverlay or imagecodecs-zarr, tensorstore say, can decode).
PIXEL_CODECS = ("jpeg", "webp", "avif", "zstd")
DEFAULT_PIXEL_CODEC = "jpeg"
#: JPEG quality 90 (libjpeg-turbo, 4:2:0): 19 kB per 224 px photo-like image (PSNR 31 dB with
#: sensor noise, 38 dB on the scikit-image photos), 0.25 ms to encode.
DEFAULT_PIXEL_QUALITY = 90
LOSSLESS = "lossless"

#: WebP effort: method 2 (lossy) is ~3x faster than libwebp's default 4 for 3% more bytes; the
#: lossless encoder at method 0 is ~20x faster than at 4 for ~12% more bytes.
WEBP_LOSSY_METHOD = 2
WEBP_LOSSLESS_METHOD = 0
#: AVIF encoder speed (0 slowest .. 10 fastest): 8 is ~16 ms per 224 px image.
AVIF_SPEED = 8


@dataclass(frozen=True)
class PixelCodec:
    """A store's pixel codec and quality (``quality`` is 1..100 or ``"lossless"``)."""

    codec: str = DEFAULT_PIXEL_CODEC
    quality: int | str = DEFAULT_PIXEL_QUALITY

    def __post_init__(self) -> None:
        problem = pixel_codec_problem(self.codec, self.quality)
        if problem:
            raise ValueError(problem)

    @property
    def lossless(self) -> bool:
        return self.quality == LOSSLESS

    def to_json(self) -> dict[str, Any]:
        return {"codec": self.codec, "quality": self.quality}

    @classmethod
    def from_json(cls, data: Any) -> PixelCodec:
        if not isinstance(data, dict):
            raise ValueError(f"pixels = {data!r} is not a mapping")
        return cls(str(data.get("codec")), data.get("quality"))  # type: ignore[arg-type]

    def zarr_codecs(self) -> dict[str, Any]:
        """``create_array`` keywords (serializer, compressors) for the (1, S, S, 3) chunks."""
        import zarr.codecs

        if self.codec == "zstd":
            return {"compressors": zarr.codecs.ZstdCodec(level=3)}
        serializer: ArrayBytesCodec
        if self.codec == "jpeg":
            serializer = JpegCodec(lossless=True) if self.lossless else JpegCodec(level=int(self.quality))
        elif self.codec == "webp":
            serializer = (WebpCodec(level=25, lossless=True, method=WEBP_LOSSLESS_METHOD) if self.lossless
                          else WebpCodec(level=float(self.quality), lossless=False, method=WEBP_LOSSY_METHOD))
        else:
            serializer = AvifCodec(level=100 if self.lossless else int(self.quality), speed=AVIF_SPEED)
        return {"serializer": serializer, "compressors": zarr.codecs.Crc32cCodec()}

    def describe(self) -> str:
        return f"{self.codec} {self.quality}" if self.codec != "zstd" else "zstd (lossless)"


def pixel_codec_problem(codec: Any, quality: Any) -> str | None:
    """Why (codec, quality) is not a pixel codec, or None: the build checks this before writing."""
    if codec not in PIXEL_CODECS:
        return f"pixel codec {codec!r} is not one of {', '.join(PIXEL_CODECS)}"
    if codec == "zstd":
        return None if quality == LOSSLESS else (
            f"pixel codec zstd is lossless; a quality ({quality!r}) applies to jpeg, webp and avif only")
    if quality == LOSSLESS:
        return None
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        return f"pixel quality must be 1..100 or {LOSSLESS!r}, not {quality!r}"
    return None


def parse_quality(text: str | int | None, codec: str) -> int | str:
    """A ``--pixel-quality`` value -> 1..100 or ``"lossless"`` (zstd: always lossless)."""
    if codec == "zstd" and text is None:
        return LOSSLESS
    if text is None:
        return DEFAULT_PIXEL_QUALITY
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
        return int(text)
    return str(text).lower()


#: Format 2 stores (and any store whose attributes name none): zstd on raw uint8.
LEGACY_PIXEL_CODEC = PixelCodec("zstd", LOSSLESS)


# ------------------------------------------------------------------------------------- codecs
class _ImageCodec(ArrayBytesCodec):
    """One (1, S, S, 3) uint8 chunk <-> one encoded image (subclasses: the codec's calls)."""

    is_fixed_size = False
    codec_name: ClassVar[str]
    config_keys: ClassVar[tuple[str, ...]]

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, cls.codec_name, require_configuration=False)
        return cls(**(config or {}))

    def to_dict(self) -> dict[str, JSON]:
        config = {k: getattr(self, k) for k in self.config_keys if getattr(self, k) is not None}
        return {"name": self.codec_name, "configuration": config} if config else {"name": self.codec_name}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        native = dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else np.dtype(dtype)
        if np.dtype(native) != np.uint8 or not shape or shape[-1] not in (1, 3):
            raise ValueError(f"{self.codec_name} stores uint8 images (…, H, W, 1 or 3), not "
                             f"{native} of shape {shape}")

    def _encode_image(self, image: np.ndarray) -> bytes:
        raise NotImplementedError

    def _decode_image(self, data: Any) -> np.ndarray:
        raise NotImplementedError

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        arr = np.asarray(chunk_array.as_numpy_array())
        image = arr.reshape(arr.shape[-3:]) if arr.ndim > 3 else arr
        return chunk_spec.prototype.buffer.from_bytes(self._encode_image(np.ascontiguousarray(image)))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        decoded = self._decode_image(chunk_bytes.as_numpy_array())
        if decoded.size != int(np.prod(chunk_spec.shape)):
            raise ValueError(f"{self.codec_name} chunk decodes to shape {decoded.shape}, not "
                             f"{chunk_spec.shape}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(decoded.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size


@dataclass(frozen=True)
class JpegCodec(_ImageCodec):
    """JPEG (libjpeg-turbo through imagecodecs); ``lossless`` is lossless JPEG (exact)."""

    codec_name: ClassVar[str] = "imagecodecs_jpeg"
    config_keys: ClassVar[tuple[str, ...]] = ("level", "lossless")
    level: int | None = None
    lossless: bool | None = None

    def __init__(self, *, level: int | None = None, lossless: bool | None = None, **_: Any) -> None:
        object.__setattr__(self, "level", None if level is None else int(level))
        object.__setattr__(self, "lossless", None if lossless is None else bool(lossless))

    def _encode_image(self, image: np.ndarray) -> bytes:
        import imagecodecs

        if self.lossless:
            return bytes(imagecodecs.jpeg8_encode(image, lossless=True))
        return bytes(imagecodecs.jpeg8_encode(image, level=self.level))

    def _decode_image(self, data: Any) -> np.ndarray:
        import imagecodecs

        return np.asarray(imagecodecs.jpeg8_decode(data))


@dataclass(frozen=True)
class WebpCodec(_ImageCodec):
    """WebP (libwebp through imagecodecs), lossy at ``level`` or lossless."""

    codec_name: ClassVar[str] = "imagecodecs_webp"
    config_keys: ClassVar[tuple[str, ...]] = ("level", "lossless", "method")
    level: float | None = None
    lossless: bool | None = None
    method: int | None = None

    def __init__(self, *, level: float | None = None, lossless: bool | None = None,
                 method: int | None = None, **_: Any) -> None:
        object.__setattr__(self, "level", None if level is None else float(level))
        object.__setattr__(self, "lossless", None if lossless is None else bool(lossless))
        object.__setattr__(self, "method", None if method is None else int(method))

    def _encode_image(self, image: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.webp_encode(image, level=self.level, lossless=self.lossless,
                                             method=self.method))

    def _decode_image(self, data: Any) -> np.ndarray:
        import imagecodecs

        return np.asarray(imagecodecs.webp_decode(data, hasalpha=False))


@dataclass(frozen=True)
class AvifCodec(_ImageCodec):
    """AVIF (libavif through imagecodecs); ``level`` 100 is lossless."""

    codec_name: ClassVar[str] = "imagecodecs_avif"
    config_keys: ClassVar[tuple[str, ...]] = ("level", "speed")
    level: int | None = None
    speed: int | None = None

    def __init__(self, *, level: int | None = None, speed: int | None = None, **_: Any) -> None:
        object.__setattr__(self, "level", None if level is None else int(level))
        object.__setattr__(self, "speed", None if speed is None else int(speed))

    def _encode_image(self, image: np.ndarray) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.avif_encode(image, level=self.level, speed=self.speed))

    def _decode_image(self, data: Any) -> np.ndarray:
        import imagecodecs

        return np.asarray(imagecodecs.avif_decode(data))


def register_pixel_codecs() -> None:
    """Make zarr-python resolve the ``imagecodecs_*`` names this module writes (idempotent);
    an implementation registered under the name already (imagecodecs-zarr's) is kept."""
    from zarr.registry import get_codec_class, register_codec

    for cls in (JpegCodec, WebpCodec, AvifCodec):
        try:
            get_codec_class(cls.codec_name)
        except KeyError:
            register_codec(cls.codec_name, cls)


register_pixel_codecs()
