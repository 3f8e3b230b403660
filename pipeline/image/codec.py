"""Decode and encode: sniff a file's container and hand it to its format, turn the stored samples
upright as float32; check an image against the output format, restate its metadata, write it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import DecodeError, EncodeError, UnsupportedImageError
from pipeline.image.declarations import check_exif
from pipeline.image.formats import FORMATS, REGISTRY
from pipeline.image.metadata import log_uncarried, output_metadata
from pipeline.image.plugin import Decoded, Format, read_file
from pipeline.image.values import Image

__all__ = ["DEFAULT_MAX_PIXELS", "decode", "encode", "format_from_name", "suffix_for"]

DEFAULT_MAX_PIXELS = 200_000_000

# OpenCV reads its decoder pixel cap from the environment once, on first use. This package does
# not decode with OpenCV, but other code in the process may call cv2.imread/imdecode on the same
# files; cap them at our default unless the operator has chosen a value.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"v/1\x01", "OpenEXR"),
    (b"%PDF", "PDF"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def suffix_for(format: str) -> str:
    """Return the file suffix we write for `format` (one of FORMATS)."""
    try:
        return REGISTRY[format].suffix
    except KeyError:
        raise ValueError(f"unknown image format {format!r}; expected one of {FORMATS}") from None


def format_from_name(name: str) -> str:
    """Map a format name or suffix ("jpg", ".TIF", "webp") to one of FORMATS."""
    key = name.strip().lower().lstrip(".")
    for fmt in REGISTRY.values():
        if key == fmt.name or key in fmt.aliases:
            return fmt.name
    raise ValueError(f"unknown image format {name!r}; expected one of {FORMATS}")


def decode(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """Decode `path` into upright float32 pixels and the metadata to carry to its outputs.

    The format is detected from the content, not the name. Raises ImageTooLargeError when the
    header declares more than `max_pixels` pixels (before any pixel is decoded),
    UnsupportedImageError for valid files we refuse rather than decode wrongly, and DecodeError
    for damaged ones; no other exception escapes.
    """
    path = Path(path)
    fmt = _sniff(path)
    return _assemble(path, fmt.name, fmt.decode(path, max_pixels))


def _sniff(path: Path) -> Format:
    """Name the container from its first bytes, refusing the formats we know but do not decode."""
    head = read_file(path, 32)
    if not head:
        raise DecodeError(path, "file is empty")
    for fmt in REGISTRY.values():
        if fmt.matches(head):
            return fmt
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS | _AVIF_BRANDS:
        name = "AVIF" if head[8:12] in _AVIF_BRANDS else "HEIC/HEIF"
        raise UnsupportedImageError(
            path,
            f"{name} image: no decoder here keeps its colour and metadata faithfully; "
            "convert it to 16-bit TIFF or PNG first",
        )
    for signature, name in _OTHER_SIGNATURES:
        if head.startswith(signature):
            raise UnsupportedImageError(
                path, f"{name} image: format not supported (JPEG, PNG, TIFF and WebP are)"
            )
    raise DecodeError(path, f"not a recognised image file (starts with {head[:8].hex(' ')})")


def _assemble(path: Path, kind: str, decoded: Decoded) -> Image:
    """Make the stored samples upright, split off alpha and scale to float32 in [0, 1]."""
    check_exif(path, decoded.metadata.exif)
    samples = decoded.samples
    if samples.ndim == 2:
        samples = samples[:, :, np.newaxis]
    samples = _orient(samples, decoded.metadata.orientation)
    colours = samples.shape[2] - int(decoded.has_alpha)
    scale = 65535.0 if samples.dtype.itemsize == 2 else 255.0
    pixels = _to_unit_float(samples[:, :, :colours], scale)
    alpha = _to_unit_float(samples[:, :, colours], scale) if decoded.has_alpha else None
    if decoded.premultiplied and alpha is not None:
        # Associated (premultiplied) alpha: our images carry straight alpha, as outputs do.
        np.divide(pixels, alpha[:, :, np.newaxis], out=pixels, where=alpha[:, :, np.newaxis] > 0)
        np.minimum(pixels, 1.0, out=pixels)
    return Image(pixels, alpha, decoded.bit_depth, kind, decoded.metadata, source=path)


def _orient(samples: np.ndarray, orientation: int) -> np.ndarray:
    """Return a view of (H, W, C) `samples` turned upright for an EXIF orientation (1-8)."""
    turned = samples.transpose(1, 0, 2)
    views = {
        1: samples,
        2: samples[:, ::-1],  # mirrored left-right
        3: samples[::-1, ::-1],  # rotated 180
        4: samples[::-1],  # mirrored top-bottom
        5: turned,  # transposed
        6: turned[:, ::-1],  # stored rotated 90 counter-clockwise: turn clockwise
        7: turned[::-1, ::-1],  # transversed
        8: turned[::-1],  # stored rotated 90 clockwise: turn counter-clockwise
    }
    return views.get(orientation, samples)


def _to_unit_float(samples: np.ndarray, scale: float) -> np.ndarray:
    values = samples.astype(np.float32, order="C")
    values /= np.float32(scale)
    return values


def encode(
    image: Image,
    path: Path,
    *,
    format: str | None = None,
    quality: int = 95,
    bit_depth: int | None = None,
) -> str:
    """Write `image` to exactly `path` with its metadata; return the format written.

    `format` defaults to the source's; `bit_depth` to the source's where the format allows (JPEG
    and WebP are 8-bit). Pixels are written upright with orientation 1; ICC is copied byte for
    byte, EXIF is patched (orientation, dimensions, no thumbnail), XMP and IPTC are carried where
    the format has a place for them, and what cannot be carried is logged. Raises EncodeError.
    """
    path = Path(path)
    name = format or image.format
    if name not in FORMATS:
        raise EncodeError(path, f"unknown output format {name!r}; expected one of {FORMATS}")
    fmt = REGISTRY[name]
    depth = _output_depth(path, fmt, bit_depth, image.bit_depth)
    _check_encodable(path, image, fmt, quality)
    metadata = output_metadata(path, image)
    log_uncarried(path, name, image, metadata)
    try:
        fmt.write(image, path, depth, quality, metadata)
    except EncodeError:
        raise
    except Exception as exc:  # disk full, codec failures...: all are EncodeErrors
        raise EncodeError(path, f"writing {name.upper()} failed: {exc}") from exc
    return name


def _output_depth(path: Path, fmt: Format, requested: int | None, source: int) -> int:
    if fmt.eight_bit_only:
        if requested == 16:
            name = fmt.name.upper()
            raise EncodeError(path, f"{name} holds 8-bit samples only; use PNG or TIFF")
        return 8
    depth = source if requested is None else requested
    if depth not in (8, 16):
        raise EncodeError(path, f"bit depth {depth} is not supported; use 8 or 16")
    return depth


def _check_encodable(path: Path, image: Image, fmt: Format, quality: int) -> None:
    pixels, alpha = image.pixels, image.alpha
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or 0 in pixels.shape:
        raise EncodeError(path, f"pixels must be (H, W, 1 or 3), not {pixels.shape}")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise EncodeError(path, f"pixels must be floating point in [0, 1], not {pixels.dtype}")
    if alpha is not None and alpha.shape != pixels.shape[:2]:
        raise EncodeError(path, f"alpha shape {alpha.shape} does not match pixels {pixels.shape}")
    limit = fmt.max_side
    if limit and max(image.width, image.height) > limit:
        raise EncodeError(
            path,
            f"{image.width}x{image.height} exceeds {fmt.name.upper()}'s limit of {limit} pixels",
        )
    if not 1 <= quality <= 100:
        raise EncodeError(path, f"quality must be between 1 and 100, not {quality}")
