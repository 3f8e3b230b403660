"""WebP: still images through Pillow's libwebp, with the canvas size checked from the first chunk
before libwebp allocates; written with exact colour under transparency, ICC, EXIF and XMP."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import WebPImagePlugin

from pipeline.errors import DecodeError, UnsupportedImageError
from pipeline.image.banding import whole
from pipeline.image.declarations import declared_orientation, exif_dpi
from pipeline.image.metadata import strip_exif_prefix
from pipeline.image.plugin import Decoded, Format, check_pixel_count, library_errors, read_file
from pipeline.image.values import Image, Metadata

__all__ = ["FORMAT"]

_MAX_SIDE = 16383
_ANIMATION_FLAG = 0x02  # in the VP8X flags byte
_VP8_START_CODE = b"\x9d\x01\x2a"
_VP8L_SIGNATURE = 0x2F


def _decode(path: Path, max_pixels: int) -> Decoded:
    data = read_file(path)
    width, height = _canvas(path, data)
    check_pixel_count(path, width, height, max_pixels)
    # The plugin class directly, not Image.open: its decompression-bomb check reads the
    # process-wide MAX_IMAGE_PIXELS, which would override the caller's max_pixels.
    with (
        library_errors(path, "damaged WebP data"),
        WebPImagePlugin.WebPImageFile(io.BytesIO(data)) as im,
    ):
        has_alpha = im.mode in ("RGBA", "LA", "PA")
        samples = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
        info = dict(im.info)
    exif = strip_exif_prefix(info.get("exif"))
    xmp = info.get("xmp") or None
    metadata = Metadata(
        icc_profile=info.get("icc_profile") or None,
        exif=exif,
        xmp=xmp,
        dpi=exif_dpi(exif),
        orientation=declared_orientation(exif, xmp),
    )
    return Decoded(samples, has_alpha, 8, metadata)


def _canvas(path: Path, data: bytes) -> tuple[int, int]:
    """Read the canvas size from the first chunk, before libwebp allocates anything."""
    if len(data) < 30:
        raise DecodeError(path, "WebP is truncated: too short for its header")
    declared = int.from_bytes(data[4:8], "little") + 8
    if declared > len(data):
        raise DecodeError(path, f"WebP is truncated: it declares {declared} bytes, has {len(data)}")
    chunk = data[12:16]
    if chunk == b"VP8X":
        if data[20] & _ANIMATION_FLAG:
            raise UnsupportedImageError(path, "animated WebP: only still images are restored")
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and data[23:26] == _VP8_START_CODE:
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == _VP8L_SIGNATURE:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise DecodeError(path, f"WebP has an invalid first chunk {chunk!r}")


def _write(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    samples = whole(image, path, 8, with_alpha=True)
    if image.channels == 1:  # WebP has no grey mode
        samples = np.concatenate(
            [np.repeat(samples[:, :, :1], 3, axis=2), samples[:, :, 1:]], axis=2
        )
    options: dict[str, object] = {"quality": quality, "alpha_quality": 100, "method": 6}
    # exact: keep the colour under fully transparent pixels, as the other formats do
    options["exact"] = True
    if meta.icc_profile:
        options["icc_profile"] = meta.icc_profile
    if meta.exif:
        options["exif"] = meta.exif
    if meta.xmp:
        options["xmp"] = meta.xmp
    PILImage.fromarray(samples).save(path, "WEBP", **options)


FORMAT = Format(
    name="webp",
    suffix=".webp",
    aliases=(),
    matches=lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP",
    decode=_decode,
    write=_write,
    max_side=_MAX_SIDE,
    eight_bit_only=True,
)
