"""Decode and encode images with their metadata (ICC, EXIF, XMP, IPTC), keeping bit depth and alpha.

Decoding is strict: a file is decoded exactly, refused with UnsupportedImageError saying what it
is, or rejected with DecodeError saying what is damaged; a silently wrong image is never returned.
Encoding carries the metadata across (EXIF patched in place, so maker notes stay valid) and writes
PNG and TIFF band by band, so disk-backed images of any size never need a full-size copy in RAM.
"""

from __future__ import annotations

import io
import logging
import math
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import imagecodecs
import numpy as np
import simplejpeg
import tifffile
from PIL import Image as PILImage
from PIL import JpegImagePlugin, WebPImagePlugin

from pipeline.buffers import release_rows
from pipeline.errors import DecodeError, EncodeError, ImageTooLargeError, UnsupportedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "Image",
    "Metadata",
    "decode",
    "encode",
    "format_from_name",
    "suffix_for",
]

FORMATS = ("jpeg", "png", "tiff", "webp")
DEFAULT_MAX_PIXELS = 200_000_000

# OpenCV reads its decoder pixel cap from the environment once, on first use. This module does
# not decode with OpenCV, but other code in the process may call cv2.imread/imdecode on the same
# files; cap them at our default unless the operator has chosen a value.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

_log = logging.getLogger(__name__)

_SUFFIXES = {"jpeg": ".jpg", "png": ".png", "tiff": ".tif", "webp": ".webp"}
_FORMAT_NAMES = {
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "png": "png",
    "tiff": "tiff",
    "tif": "tiff",
    "webp": "webp",
}

_BAND_ROWS = 256  # rows converted per step when encoding; equals the TIFF tile height
_MAX_TEXT_BYTES = 1 << 20  # a PNG text chunk inflating past this is a bomb (Pillow's limit)
_MAX_PROFILE_BYTES = 16 << 20  # same guard for ICC profiles and XMP packets
_TIFF_PAGE_SCAN_LIMIT = 64
_JPEG_MAX_SIDE = 65500  # libjpeg-turbo's JPEG_MAX_DIMENSION
_WEBP_MAX_SIDE = 16383
_PNG_MAX_SIDE = 2**31 - 1
_JPEG_MAX_SEGMENT = 65533  # payload bytes of one APPn marker segment
_CLASSIC_TIFF_LIMIT = 2**32  # bytes a classic TIFF can address; beyond it we write BigTIFF
_TIFF_BUFFER_BYTES = 32 << 20  # tiles tifffile may hold for its compression threads


@dataclass(frozen=True)
class Metadata:
    """Metadata carried from a source to its outputs. Byte blocks are kept exactly as read."""

    icc_profile: bytes | None = None
    exif: bytes | None = None  # raw TIFF-structured EXIF block ("II*\0"/"MM\0*"), as in the file
    xmp: bytes | None = None
    iptc: bytes | None = None  # IPTC-IIM records (the payload of Photoshop resource 0x0404)
    dpi: tuple[float, float] | None = None
    orientation: int = 1  # the EXIF orientation the source declared; already applied to pixels
    # Keyword/text pairs: PNG tEXt/zTXt/iTXt chunks, or a JPEG COM segment as ("Comment", text).
    text: tuple[tuple[str, str], ...] = ()
    # PNG colour chunks besides iCCP (gAMA, cHRM, sRGB, cICP) as (type, payload); PNG output only.
    png_colour: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Image:
    """Upright pixels as float32 in [0, 1], shape (H, W, C) with C 1 (grey) or 3 (RGB)."""

    pixels: np.ndarray
    alpha: np.ndarray | None  # float32 (H, W) in [0, 1], or None
    bit_depth: int  # 8 or 16: the source's sample depth, kept on output where the format allows
    format: str  # the source container, one of FORMATS
    metadata: Metadata
    source: Path | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])

    def replace(self, **changes: object) -> Image:
        return replace(self, **changes)


def suffix_for(format: str) -> str:
    """Return the file suffix we write for `format` (one of FORMATS)."""
    try:
        return _SUFFIXES[format]
    except KeyError:
        raise ValueError(f"unknown image format {format!r}; expected one of {FORMATS}") from None


def format_from_name(name: str) -> str:
    """Map a format name or suffix ("jpg", ".TIF", "webp") to one of FORMATS."""
    try:
        return _FORMAT_NAMES[name.strip().lower().lstrip(".")]
    except KeyError:
        raise ValueError(f"unknown image format {name!r}; expected one of {FORMATS}") from None


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class _Decoded:
    """What a format decoder hands back: stored (not yet upright) integer samples and metadata."""

    samples: np.ndarray  # (H, W) or (H, W, C) uint8/uint16; alpha is the last channel if present
    has_alpha: bool
    bit_depth: int
    metadata: Metadata
    premultiplied: bool = False


def decode(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image:
    """Decode `path` into upright float32 pixels and the metadata to carry to its outputs.

    The format is detected from the content, not the name. Raises ImageTooLargeError when the
    header declares more than `max_pixels` pixels (before any pixel is decoded),
    UnsupportedImageError for valid files we refuse rather than decode wrongly, and DecodeError
    for damaged ones; no other exception escapes.
    """
    path = Path(path)
    kind = _sniff(path)
    decoded = _DECODERS[kind](path, max_pixels)
    return _assemble(path, kind, decoded)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
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


def _sniff(path: Path) -> str:
    """Name the container from its first bytes, refusing the formats we know but do not decode."""
    head = _read(path, 32)
    if not head:
        raise DecodeError(path, "file is empty")
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
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


def _read(path: Path, size: int = -1) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise DecodeError(path, f"cannot read file: {exc.strerror or exc}") from exc


@contextmanager
def _library_errors(path: Path, what: str) -> Iterator[None]:
    """Turn whatever a third-party decoder raises on hostile input into a DecodeError.

    Pillow, tifffile and imagecodecs raise a wide, undocumented range of exception types on
    malformed data (struct.error, IndexError, UnicodeDecodeError, codec errors...); callers must
    only ever see our errors, with the library's message and the original chained.
    """
    try:
        yield
    except DecodeError:
        raise
    except Exception as exc:  # see docstring
        raise DecodeError(path, f"{what}: {exc}") from exc


def _check_pixel_count(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            path,
            f"declares {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,}",
        )


def _assemble(path: Path, kind: str, decoded: _Decoded) -> Image:
    """Make the stored samples upright, split off alpha and scale to float32 in [0, 1]."""
    _check_exif(path, decoded.metadata.exif)
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


def _check_exif(path: Path, exif: bytes | None) -> None:
    """Refuse an EXIF block we cannot parse: carrying it blind or dropping it silently would
    both lose the photo's metadata, and its orientation could not be trusted either."""
    if not exif:
        return
    try:
        layout = _tiff_layout(exif)
        _read_ifd(exif, layout.first_ifd, layout)
    except (_ExifError, struct.error) as exc:
        raise DecodeError(path, f"malformed EXIF block: {exc}") from exc


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


def _strip_exif_prefix(exif: bytes | None) -> bytes | None:
    if exif and exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    return bytes(exif) if exif else None


def _jfif_dpi(info: dict) -> tuple[float, float] | None:
    # Only a JFIF density with a real unit; Pillow's own "dpi" falls back to an invented 72.
    factor = {1: 1.0, 2: 2.54}.get(info.get("jfif_unit", 0))
    density = info.get("jfif_density")
    if factor is None or not density or not all(density):
        return None
    return density[0] * factor, density[1] * factor


def _exif_dpi(exif: bytes | None) -> tuple[float, float] | None:
    """XResolution/YResolution/ResolutionUnit of an EXIF block's IFD0, as dots per inch."""
    if not exif:
        return None
    try:
        layout = _tiff_layout(exif)
        entries, _ = _read_ifd(exif, layout.first_ifd, layout, follow=False)
    except (_ExifError, struct.error):
        return None
    return _tiff_dpi({e.tag: e for e in entries if e.data is not None}, layout.order)


def _declared_orientation(exif: bytes | None, xmp: bytes | None) -> int:
    """EXIF Orientation, else XMP tiff:Orientation (the MWG order), else 1; invalid values are 1."""
    value = _exif_orientation(exif)
    if value is None:
        value = _xmp_orientation(xmp)
    return value if value in range(1, 9) else 1


# --- JPEG ------------------------------------------------------------------------------------

_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SOF_REFUSED = {
    0xC3: "lossless JPEG",
    0xC5: "hierarchical JPEG",
    0xC6: "hierarchical JPEG",
    0xC7: "lossless hierarchical JPEG",
    0xCB: "lossless arithmetic-coded JPEG",
    0xCD: "hierarchical arithmetic-coded JPEG",
    0xCE: "hierarchical arithmetic-coded JPEG",
    0xCF: "lossless hierarchical arithmetic-coded JPEG",
}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class _JpegFrame(NamedTuple):
    width: int
    height: int
    components: int
    stream: bytes  # the file with stray bytes between header segments removed


def _decode_jpeg(path: Path, max_pixels: int) -> _Decoded:
    data = _read(path)
    frame = _jpeg_frame(path, data)
    _check_pixel_count(path, frame.width, frame.height, max_pixels)
    metadata = _jpeg_metadata(path, frame.stream)
    colorspace = "GRAY" if frame.components == 1 else "RGB"
    try:
        # Strict: libjpeg's "corrupt data" warnings mean blocks were zero-filled or resynchronised,
        # which Pillow and OpenCV return as an image; we refuse them. (Same libjpeg-turbo and
        # settings as Pillow, so pixels are identical to Pillow's for intact files.)
        samples = simplejpeg.decode_jpeg(frame.stream, colorspace=colorspace, strict=True)
    except Exception as exc:  # ValueError for damage; anything else is damage too
        raise DecodeError(path, f"damaged JPEG data: {exc}") from exc
    return _Decoded(samples, has_alpha=False, bit_depth=8, metadata=metadata)


def _jpeg_frame(path: Path, data: bytes) -> _JpegFrame:
    """Walk the marker segments up to the first scan and refuse what we cannot decode faithfully.

    Bytes between segments that belong to no segment mean a segment length is wrong or the
    header was overwritten: the metadata segments around them can no longer be trusted, so the
    file is refused as damaged rather than restored with possibly garbled metadata.
    """
    parts = [data[:2]]
    frame: tuple[int, int, int] | None = None
    pos = 2
    while True:
        expected = pos
        marker, pos = _next_jpeg_marker(path, data, pos)
        stray = data[expected : pos - 2].lstrip(b"\xff")  # 0xFF fill bytes are legal
        if stray:
            raise DecodeError(
                path,
                f"damaged JPEG header: {len(stray)} stray bytes before marker 0xFF{marker:02X} "
                f"at byte {pos - 2} (a segment length is wrong)",
            )
        if marker in _JPEG_STANDALONE:
            parts.append(bytes((0xFF, marker)))
            continue
        if marker == 0xD9:
            raise DecodeError(path, "JPEG ends (EOI) before any image data")
        end = _jpeg_segment_end(path, data, pos, marker)
        parts.append(bytes((0xFF, marker)) + data[pos:end])
        if marker in _JPEG_SOF:
            frame = _jpeg_sof(path, marker, data[pos + 2 : end])
        pos = end
        if marker == 0xDA:
            break
    if frame is None:
        raise DecodeError(path, "JPEG has scan data but no frame header (SOF)")
    parts.append(data[pos:])
    return _JpegFrame(*frame, stream=b"".join(parts))


def _next_jpeg_marker(path: Path, data: bytes, pos: int) -> tuple[int, int]:
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            raise DecodeError(path, "JPEG is truncated: the header ends before the image data")
        marker = data[pos + 1]
        if marker not in (0x00, 0xFF):  # 0xFF is fill before a marker; 0x00 is not a marker
            return marker, pos + 2
        pos += 1


def _jpeg_segment_end(path: Path, data: bytes, pos: int, marker: int) -> int:
    if pos + 2 > len(data):
        raise DecodeError(path, f"JPEG is truncated inside marker 0xFF{marker:02X}")
    end = pos + int.from_bytes(data[pos : pos + 2], "big")
    if end < pos + 2 or end > len(data):
        raise DecodeError(path, f"JPEG marker segment 0xFF{marker:02X} runs past the end of file")
    return end


def _jpeg_sof(path: Path, marker: int, body: bytes) -> tuple[int, int, int]:
    if marker in _JPEG_SOF_REFUSED:
        raise UnsupportedImageError(
            path, f"{_JPEG_SOF_REFUSED[marker]}: this coding process cannot be decoded here"
        )
    if len(body) < 6:
        raise DecodeError(path, "JPEG frame header (SOF) is truncated")
    precision, height, width, components = struct.unpack_from(">BHHB", body)
    if precision != 8:
        raise UnsupportedImageError(
            path, f"{precision}-bit JPEG: only 8-bit JPEG can be decoded faithfully here"
        )
    if height == 0:
        raise UnsupportedImageError(path, "JPEG whose height is only given by a DNL marker")
    if width == 0:
        raise DecodeError(path, "JPEG frame header declares a width of 0")
    if components == 4:
        raise UnsupportedImageError(
            path, "CMYK/YCCK JPEG (4 colour components): convert it to RGB with its profile first"
        )
    if components not in (1, 3):
        raise UnsupportedImageError(path, f"JPEG with {components} colour components")
    return width, height, components


def _jpeg_metadata(path: Path, stream: bytes) -> Metadata:
    # Pillow's lazy open parses the APPn/COM segments (multi-segment ICC, Photoshop resources,
    # JFIF density) without decoding pixels. The plugin class is used directly, not
    # Image.open: its decompression-bomb check reads the process-wide MAX_IMAGE_PIXELS, which
    # would override the caller's max_pixels (already enforced above from our own header walk).
    with (
        _library_errors(path, "unreadable JPEG header"),
        JpegImagePlugin.JpegImageFile(io.BytesIO(stream)) as im,
    ):
        info = dict(im.info)
    exif = _strip_exif_prefix(info.get("exif"))
    xmp = info.get("xmp") or None
    comment = info.get("comment")
    photoshop = info.get("photoshop") or {}
    return Metadata(
        icc_profile=info.get("icc_profile") or None,
        exif=exif,
        xmp=xmp,
        iptc=photoshop.get(0x0404) or None,
        dpi=_jfif_dpi(info) or _exif_dpi(exif),
        orientation=_declared_orientation(exif, xmp),
        text=(("Comment", comment.decode("utf-8", "replace")),) if comment else (),
    )


# --- PNG -------------------------------------------------------------------------------------

_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_COLOUR_CHUNKS = {b"gAMA", b"cHRM", b"sRGB", b"cICP"}
_PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
_XMP_KEYWORD = "XML:com.adobe.xmp"


class _PngHeader(NamedTuple):
    width: int
    height: int
    depth: int
    colour_type: int


def _decode_png(path: Path, max_pixels: int) -> _Decoded:
    data = _read(path)
    chunks = _png_chunks(path, data)
    header = _png_header(path, next(chunks, None))
    _check_pixel_count(path, header.width, header.height, max_pixels)
    metadata = _png_metadata(path, chunks)  # structural damage is reported before refusals
    _check_png_stream_end(path, data)
    if header.colour_type == 0 and header.depth == 1:
        raise UnsupportedImageError(path, "1-bit bilevel PNG: restoration needs continuous tone")
    # Every chunk and CRC is verified above; libpng (via imagecodecs) then rejects bad zlib data,
    # bad filters and short image data, and keeps 16-bit samples, tRNS and grey+alpha exactly.
    with _library_errors(path, "damaged PNG image data"):
        samples = imagecodecs.png_decode(data)
    expected_dtype = np.uint16 if header.depth == 16 else np.uint8
    if samples.shape[:2] != (header.height, header.width) or samples.dtype != expected_dtype:
        raise DecodeError(path, f"PNG decoded to {samples.shape} {samples.dtype}, not its header")
    has_alpha = samples.ndim == 3 and samples.shape[2] in (2, 4)
    return _Decoded(samples, has_alpha, 16 if header.depth == 16 else 8, metadata)


def _check_png_stream_end(path: Path, data: bytes) -> None:
    """Refuse image data that goes on after the compressed stream ends (libpng only warns):
    the file was damaged or spliced, and which part is the image cannot be known."""
    inflater = zlib.decompressobj()
    idat = (body for kind, body in _png_chunks(path, data) if kind == b"IDAT")
    for body in idat:
        pending = bytes(body)
        while pending and not inflater.eof:
            try:
                inflater.decompress(pending, 1 << 20)  # bounded: output is discarded
            except zlib.error as exc:
                raise DecodeError(path, f"damaged PNG image data: {exc}") from exc
            pending = inflater.unconsumed_tail
        if inflater.eof and (inflater.unused_data or pending or next(idat, None) is not None):
            raise DecodeError(path, "PNG has image data after the end of its compressed stream")


def _png_chunks(path: Path, data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (type, payload) for every chunk up to IEND, verifying lengths and CRCs."""
    view = memoryview(data)
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise DecodeError(path, "PNG is truncated: it ends before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("latin-1")
        body_end = pos + 8 + length
        if length > 0x7FFFFFFF or body_end + 4 > len(data):
            raise DecodeError(path, f"PNG is truncated: chunk {name!r} runs past the end of file")
        if zlib.crc32(view[pos + 4 : body_end]) != int.from_bytes(data[body_end : body_end + 4]):
            raise DecodeError(path, f"PNG chunk {name!r} at byte {pos} fails its CRC check")
        yield kind, view[pos + 8 : body_end]
        if kind == b"IEND":
            return
        pos = body_end + 4


def _png_header(path: Path, chunk: tuple[bytes, memoryview] | None) -> _PngHeader:
    if chunk is None or chunk[0] != b"IHDR" or len(chunk[1]) != 13:
        raise DecodeError(path, "PNG does not start with a valid IHDR chunk")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunk[1]
    )
    if not (width and height) or depth not in _PNG_DEPTHS.get(colour, ()):
        raise DecodeError(
            path, f"PNG header is invalid ({width}x{height}, {depth}-bit type {colour})"
        )
    if compression or filtering or interlace > 1:
        raise DecodeError(path, "PNG header names an unknown compression, filter or interlace")
    return _PngHeader(width, height, depth, colour)


def _png_metadata(path: Path, chunks: Iterator[tuple[bytes, memoryview]]) -> Metadata:
    """Consume the chunks after IHDR, checking their order and collecting what we carry."""
    found = _PngMetadata(path)
    seen_idat = idat_ended = False
    for kind, body in chunks:
        if kind == b"IDAT":
            if idat_ended:
                raise DecodeError(path, "PNG image data (IDAT) is interrupted by other chunks")
            seen_idat = True
            continue
        idat_ended = seen_idat
        if kind == b"acTL":
            raise UnsupportedImageError(path, "animated PNG (APNG): only still images are restored")
        if not kind[0] & 0x20 and kind not in (b"PLTE", b"IEND"):
            name = kind.decode("latin-1")
            raise UnsupportedImageError(path, f"PNG uses critical chunk {name!r}, unknown here")
        found.add(kind, body)
    if not seen_idat:
        raise DecodeError(path, "PNG has no image data (no IDAT chunk)")
    return found.metadata()


@dataclass
class _PngMetadata:
    """Collects the ancillary chunks we carry while the chunk walk validates the file."""

    path: Path
    icc_profile: bytes | None = None
    exif: bytes | None = None
    legacy_exif: bytes | None = None  # ImageMagick's "Raw profile type exif" text chunk
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    text: list[tuple[str, str]] = field(default_factory=list)
    colour: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, kind: bytes, body: memoryview) -> None:
        if kind == b"iCCP":
            self.icc_profile = _png_iccp(self.path, body)
        elif kind == b"eXIf":
            self.exif = _strip_exif_prefix(bytes(body))
        elif kind == b"pHYs":
            self.dpi = _png_dpi(body)
        elif kind in _PNG_COLOUR_CHUNKS:
            self.colour.append((kind.decode("ascii"), bytes(body)))
        elif kind in _PNG_TEXT_CHUNKS:
            self.add_text(kind, body)

    def add_text(self, kind: bytes, body: memoryview) -> None:
        keyword, value = _png_text(self.path, kind, body)
        if keyword == _XMP_KEYWORD:
            self.xmp = value
        elif keyword == "Raw profile type exif":
            self.legacy_exif = _imagemagick_profile(value)
        elif keyword.startswith("Raw profile type "):
            # Other legacy ImageMagick profiles duplicate chunks we read properly (or are stale).
            _log.info("%s: ignoring legacy ImageMagick %r text chunk", self.path, keyword)
        else:
            encoding = "utf-8" if kind == b"iTXt" else "latin-1"
            self.text.append((keyword, value.decode(encoding, "replace")))

    def metadata(self) -> Metadata:
        exif = self.exif or self.legacy_exif
        return Metadata(
            icc_profile=self.icc_profile,
            exif=exif,
            xmp=self.xmp,
            dpi=self.dpi or _exif_dpi(exif),
            orientation=_declared_orientation(exif, self.xmp),
            text=tuple(self.text),
            png_colour=tuple(self.colour),
        )


def _png_iccp(path: Path, body: memoryview) -> bytes:
    _, _, rest = bytes(body).partition(b"\x00")
    if not rest or rest[0] != 0:
        raise DecodeError(path, "PNG iCCP chunk is malformed")
    return _inflate(path, rest[1:], _MAX_PROFILE_BYTES, "PNG iCCP profile")


def _png_dpi(body: memoryview) -> tuple[float, float] | None:
    if len(body) != 9:
        return None
    x, y, unit = struct.unpack(">IIB", body)
    return (x * 0.0254, y * 0.0254) if unit == 1 and x and y else None


def _png_text(path: Path, kind: bytes, body: memoryview) -> tuple[str, bytes]:
    """Return (keyword, raw text bytes) of a tEXt/zTXt/iTXt chunk, inflating within limits."""
    keyword_bytes, _, rest = bytes(body).partition(b"\x00")
    keyword = keyword_bytes.decode("latin-1")
    limit = _MAX_PROFILE_BYTES if keyword == _XMP_KEYWORD else _MAX_TEXT_BYTES
    what = f"PNG {kind.decode()} chunk {keyword!r}"
    if kind == b"tEXt":
        return keyword, rest
    if kind == b"zTXt":
        return keyword, _inflate(path, rest[1:], limit, what)
    compressed = rest[:1] == b"\x01"
    text = rest[2:].split(b"\x00", 2)[-1]  # after the language tag and translated keyword
    return keyword, _inflate(path, text, limit, what) if compressed else text


def _imagemagick_profile(value: bytes) -> bytes | None:
    # ImageMagick's legacy "Raw profile type exif": "\nexif\n   <length>\n<hex lines>".
    try:
        return _strip_exif_prefix(bytes.fromhex("".join(value.decode("ascii").split("\n")[3:])))
    except ValueError:
        return None


def _inflate(path: Path, data: bytes, limit: int, what: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise DecodeError(path, f"{what} is corrupt: {exc}") from exc
    if inflater.unconsumed_tail:
        raise DecodeError(path, f"{what} inflates past {limit >> 20} MiB (decompression bomb?)")
    if not inflater.eof:
        raise DecodeError(path, f"{what} is truncated")
    return out


# --- TIFF ------------------------------------------------------------------------------------

_TIFF_COLOURS = {0: 1, 1: 1, 2: 3}  # MinIsWhite, MinIsBlack, RGB
_TIFF_PHOTOMETRIC_NAMES = {
    3: "palette-colour",
    4: "transparency-mask",
    5: "CMYK (separated)",
    6: "YCbCr (not JPEG-compressed)",
    8: "CIE L*a*b*",
    9: "ICC L*a*b*",
    10: "ITU L*a*b*",
    32803: "colour-filter-array raw",
    32844: "LogL",
    32845: "LogLuv",
    34892: "linear raw",
}
_TIFF_SAMPLE_FORMATS = {2: "signed-integer", 3: "floating-point", 5: "complex", 6: "complex"}


def _lzw_decode_checked(data: bytes, out: object = None, **options: object) -> object:
    """imagecodecs.lzw_decode left to size its output itself. Given a size, as tifffile gives
    it, imagecodecs 2026.3 writes past its buffer on some corrupt streams (a segfault, found
    by bench/fuzz.py); unsized, it measures the stream first and raises on the corruption."""
    if out is not None and not isinstance(out, int):
        return imagecodecs.lzw_decode(data, out=out, **options)
    decoded = imagecodecs.lzw_decode(data, **options)
    return decoded if out is None or len(decoded) <= out else decoded[:out]


class _CheckedDecompressors(Mapping[int, Callable[..., object]]):
    """tifffile's table of decompressors, with LZW (5) through _lzw_decode_checked."""

    def __init__(self, table: Mapping[int, Callable[..., object]]) -> None:
        self._table = table

    def __getitem__(self, key: int) -> Callable[..., object]:
        return _lzw_decode_checked if key == 5 else self._table[key]

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[int]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


# tifffile takes every page's decompressor from this one process-wide table: no per-call hook.
if not isinstance(tifffile.TIFF.DECOMPRESSORS, _CheckedDecompressors):
    tifffile.TIFF.DECOMPRESSORS = _CheckedDecompressors(tifffile.TIFF.DECOMPRESSORS)


class _TiffSamples(NamedTuple):
    colours: int
    has_alpha: bool
    premultiplied: bool
    invert: bool  # MinIsWhite: 0 is white


def _decode_tiff(path: Path, max_pixels: int) -> _Decoded:
    with _library_errors(path, "unreadable TIFF"), tifffile.TiffFile(path) as tif:
        page = _tiff_first_page(path, tif)
        _check_pixel_count(path, page.imagewidth, page.imagelength, max_pixels)
        layout = _tiff_sample_layout(path, page)
        _check_tiff_segments(path, page, tif.filehandle.size)
        samples = _tiff_pixels(path, page, layout)
    metadata = _tiff_metadata(path)
    return _Decoded(samples, layout.has_alpha, samples.itemsize * 8, metadata, layout.premultiplied)


def _tiff_first_page(path: Path, tif: tifffile.TiffFile) -> tifffile.TiffPage:
    """Return page 0, refusing files with more than one full-resolution image."""
    full_resolution = 0
    for index, page in enumerate(tif.pages):
        if index == _TIFF_PAGE_SCAN_LIMIT:
            raise UnsupportedImageError(
                path, f"TIFF with more than {index} pages: only single images are restored"
            )
        if not page.subfiletype & 1:  # bit 0 marks a reduced-resolution copy (thumbnail, pyramid)
            full_resolution += 1
    if not len(tif.pages):
        raise DecodeError(path, "TIFF contains no readable image directory")
    if full_resolution > 1:
        raise UnsupportedImageError(
            path,
            f"multi-page TIFF with {full_resolution} full-resolution pages: "
            "only single images are restored",
        )
    first = tif.pages.first
    if first.subfiletype & 1:
        raise UnsupportedImageError(path, "TIFF whose first page is a reduced-resolution preview")
    return first


def _tiff_sample_layout(path: Path, page: tifffile.TiffPage) -> _TiffSamples:
    photometric = int(page.photometric)
    colours = _TIFF_COLOURS.get(photometric)
    if photometric == 6 and page.compression == 7:
        colours = 3  # tifffile decodes JPEG-compressed YCbCr to RGB
    if colours is None:
        name = _TIFF_PHOTOMETRIC_NAMES.get(photometric, f"photometric {photometric}")
        raise UnsupportedImageError(path, f"{name} TIFF: this colour model is not supported")
    if page.sampleformat != 1:
        kind = _TIFF_SAMPLE_FORMATS.get(int(page.sampleformat), f"format {page.sampleformat}")
        raise UnsupportedImageError(path, f"TIFF with {kind} samples: only unsigned integers")
    bits = page.bitspersample
    if bits == 1:
        raise UnsupportedImageError(path, "1-bit bilevel TIFF: restoration needs continuous tone")
    if bits not in (8, 16):
        raise UnsupportedImageError(
            path, f"{bits}-bit TIFF samples: only 8- and 16-bit samples are decoded faithfully"
        )
    if page.imagedepth > 1:
        raise UnsupportedImageError(path, "volumetric (3-D) TIFF")
    extra = page.samplesperpixel - colours
    kinds = tuple(int(k) for k in page.extrasamples)
    if extra == 0:
        return _TiffSamples(colours, False, False, photometric == 0)
    if extra == 1 and kinds in ((1,), (2,)):  # associated or unassociated alpha
        return _TiffSamples(colours, True, kinds == (1,), photometric == 0)
    raise UnsupportedImageError(
        path, f"TIFF with {extra} extra samples {kinds}: only one alpha channel is supported"
    )


def _check_tiff_segments(path: Path, page: tifffile.TiffPage, file_size: int) -> None:
    """Refuse missing or out-of-file strips/tiles: tifffile would fill them with zeros silently."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    planes = page.samplesperpixel if page.planarconfig == 2 else 1
    if page.is_tiled:
        across = math.ceil(page.imagewidth / page.tilewidth)
        expected = math.ceil(page.imagelength / page.tilelength) * across * planes
    else:
        rows = min(page.rowsperstrip or page.imagelength, page.imagelength)
        expected = math.ceil(page.imagelength / rows) * planes
    if offsets.size != expected or counts.size != expected:
        raise DecodeError(
            path, f"TIFF lists {offsets.size} image segments where its geometry needs {expected}"
        )
    bad = (offsets <= 0) | (counts <= 0) | (offsets + counts > file_size)
    if bad.any():
        raise DecodeError(
            path,
            f"TIFF image segment {int(np.argmax(bad))} is missing or lies past the end of the "
            "file (truncated?)",
        )


def _tiff_pixels(path: Path, page: tifffile.TiffPage, layout: _TiffSamples) -> np.ndarray:
    samples = page.asarray()
    if page.axes.startswith("S"):  # planar configuration: (samples, rows, columns)
        samples = np.moveaxis(samples, 0, -1)
    if samples.ndim == 2:
        samples = samples[:, :, np.newaxis]
    channels = layout.colours + int(layout.has_alpha)
    if samples.shape != (page.imagelength, page.imagewidth, channels):
        raise DecodeError(path, f"TIFF decoded to shape {samples.shape}, not what it declares")
    if layout.invert:
        grey = samples[:, :, :1]
        np.subtract(np.iinfo(samples.dtype).max, grey, out=grey)
    return samples


def _tiff_metadata(path: Path) -> Metadata:
    """Read ICC, XMP, IPTC, resolution, orientation and the EXIF-worthy tags of page 0."""
    try:
        with (
            path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        ):
            layout = _tiff_layout(buf)
            try:
                entries, _ = _read_ifd(buf, layout.first_ifd, layout)
            except _ExifError as exc:
                # IFD0 itself was readable (tifffile decoded it); only a sub-IFD is damaged.
                _log.warning("%s: EXIF/GPS directory unreadable, not carried: %s", path, exc)
                entries, _ = _read_ifd(buf, layout.first_ifd, layout, follow=False)
    except (OSError, ValueError, struct.error) as exc:
        raise DecodeError(path, f"unreadable TIFF directory: {exc}") from exc
    tags = {entry.tag: entry for entry in entries if entry.data is not None}
    orientation = _entry_int(tags[274], layout.order) if 274 in tags else 1
    return Metadata(
        icc_profile=tags[34675].data if 34675 in tags else None,
        exif=_exif_from_tiff(entries, layout.order),
        xmp=tags[700].data if 700 in tags else None,
        iptc=tags[33723].data if 33723 in tags else None,
        dpi=_tiff_dpi(tags, layout.order),
        orientation=orientation if orientation in range(1, 9) else 1,
    )


def _tiff_dpi(tags: dict[int, _Entry], order: str) -> tuple[float, float] | None:
    unit = _entry_int(tags[296], order) if 296 in tags else 2  # the TIFF default is inches
    factor = {2: 1.0, 3: 2.54}.get(unit or 0)
    if factor is None or 282 not in tags or 283 not in tags:
        return None
    values = []
    for tag in (282, 283):
        entry = tags[tag]
        if entry.kind != 5 or entry.count < 1:
            return None
        numerator, denominator = struct.unpack_from(order + "II", entry.data)
        if not (numerator and denominator):
            return None
        values.append(numerator / denominator * factor)
    return values[0], values[1]


# --- WebP ------------------------------------------------------------------------------------


def _decode_webp(path: Path, max_pixels: int) -> _Decoded:
    data = _read(path)
    width, height = _webp_canvas(path, data)
    _check_pixel_count(path, width, height, max_pixels)
    # The plugin class directly, not Image.open: see _jpeg_metadata.
    with (
        _library_errors(path, "damaged WebP data"),
        WebPImagePlugin.WebPImageFile(io.BytesIO(data)) as im,
    ):
        has_alpha = im.mode in ("RGBA", "LA", "PA")
        samples = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
        info = dict(im.info)
    exif = _strip_exif_prefix(info.get("exif"))
    xmp = info.get("xmp") or None
    metadata = Metadata(
        icc_profile=info.get("icc_profile") or None,
        exif=exif,
        xmp=xmp,
        dpi=_exif_dpi(exif),
        orientation=_declared_orientation(exif, xmp),
    )
    return _Decoded(samples, has_alpha, 8, metadata)


def _webp_canvas(path: Path, data: bytes) -> tuple[int, int]:
    """Read the canvas size from the first chunk, before libwebp allocates anything."""
    if len(data) < 30:
        raise DecodeError(path, "WebP is truncated: too short for its header")
    declared = int.from_bytes(data[4:8], "little") + 8
    if declared > len(data):
        raise DecodeError(path, f"WebP is truncated: it declares {declared} bytes, has {len(data)}")
    chunk = data[12:16]
    if chunk == b"VP8X":
        if data[20] & 0x02:
            raise UnsupportedImageError(path, "animated WebP: only still images are restored")
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise DecodeError(path, f"WebP has an invalid first chunk {chunk!r}")


_DECODERS: dict[str, Callable[[Path, int], _Decoded]] = {
    "jpeg": _decode_jpeg,
    "png": _decode_png,
    "tiff": _decode_tiff,
    "webp": _decode_webp,
}


# --------------------------------------------------------------------------------------------
# TIFF directories: the structure of EXIF blocks and of TIFF files alike. Our own small reader
# and writer, because piexif and Pillow re-serialise every value on output (moving maker notes,
# whose internal offsets then point at the wrong bytes) and neither writes a sub-IFD into a TIFF.

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TYPE_SIZES.update({16: 8, 17: 8, 18: 8})  # BigTIFF's 64-bit integers and IFD offsets
_SWAP_UNITS = {3: 2, 4: 4, 5: 4, 8: 2, 9: 4, 10: 4, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 34665, 34853, 40965
_SUB_IFD_TAGS = {_EXIF_IFD, _GPS_IFD, _INTEROP_IFD}
_MAX_IFD_ENTRIES = 65535  # the most a classic TIFF directory can hold
# IFD0 tags of a TIFF source that are EXIF metadata rather than image structure or private blobs
# (Photoshop layers, ImageJ data...). Only these enter the EXIF we carry to other formats.
_TIFF_TAGS_FOR_EXIF = frozenset(
    {269, 270, 271, 272, 274, 282, 283, 285, 296, 305, 306, 315, 316, 318, 319, 33432}
    | {18246, 18249, 40091, 40092, 40093, 40094, 40095}
)
# IFD0 tags a TIFF writer owns (image layout) or that we write from dedicated fields; EXIF IFD0
# tags with these numbers are not copied into a TIFF's own IFD0.
_TIFF_STRUCTURE_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 282, 283, 284}
    | {296, 297, 317, 320, 322, 323, 324, 325, 330, 338, 339, 340, 341, 347, 513, 514}
    | {515, 517, 518, 519, 520, 521, 529, 530, 531, 532, 700, 33723, 34377, 34675}
)


class _ExifError(ValueError):
    """A TIFF-structured block cannot be parsed safely."""


class _Layout(NamedTuple):
    order: str  # struct byte order: "<" or ">"
    big: bool  # BigTIFF: 8-byte counts and offsets, 20-byte entries
    first_ifd: int


@dataclass(frozen=True)
class _Entry:
    tag: int
    kind: int  # TIFF field type
    count: int
    data: bytes | None  # value bytes in the source byte order; None if unreadable
    position: int  # offset of the directory entry itself, for patching in place
    children: tuple[_Entry, ...] | None = None  # the sub-IFD an Exif/GPS/Interop pointer leads to


def _tiff_layout(buf: bytes | bytearray | mmap.mmap) -> _Layout:
    if len(buf) < 8:
        raise _ExifError("too short for a TIFF header")
    order = {b"II": "<", b"MM": ">"}.get(bytes(buf[:2]))
    if order is None:
        raise _ExifError("no TIFF byte-order mark")
    (magic,) = struct.unpack_from(order + "H", buf, 2)
    if magic == 42:
        return _Layout(order, False, struct.unpack_from(order + "I", buf, 4)[0])
    if magic == 43 and len(buf) >= 16:
        return _Layout(order, True, struct.unpack_from(order + "Q", buf, 8)[0])
    raise _ExifError(f"TIFF magic number {magic} is neither 42 nor 43")


def _read_ifd(
    buf,
    offset: int,
    layout: _Layout,
    *,
    follow: bool = True,
    depth: int = 0,
    seen: set[int] | None = None,
) -> tuple[list[_Entry], int]:
    """Read the directory at `offset`; return its entries and the offset of the next directory.

    With `follow`, Exif/GPS/Interop pointers are read into `children`. Structural damage raises
    _ExifError; an entry whose value lies outside the data is kept with data None. A directory
    reached twice is damage too: besides loops, pointers fanning out to one shared directory
    would make the walk exponential (a few kilobytes of EXIF, billions of entries to read).
    """
    count_format, head, entry_size = ("Q", 8, 20) if layout.big else ("H", 2, 12)
    word = 8 if layout.big else 4
    seen = set() if seen is None else seen
    if depth > 3:
        raise _ExifError("sub-directories nest too deeply (a loop?)")
    if offset in seen:
        raise _ExifError(f"directory at {offset} is reached twice (a loop?)")
    seen.add(offset)
    if offset < 8 or offset + head > len(buf):
        raise _ExifError(f"directory offset {offset} lies outside the data")
    (count,) = struct.unpack_from(layout.order + count_format, buf, offset)
    table_end = offset + head + count * entry_size
    if table_end + word > len(buf):
        raise _ExifError(f"directory at {offset} with {count} entries runs past the data")
    if count > _MAX_IFD_ENTRIES:  # only BigTIFF can declare more; each entry costs memory
        raise _ExifError(f"directory at {offset} declares {count} entries")
    entries = [
        _read_entry(buf, offset + head + index * entry_size, layout, follow, depth, seen)
        for index in range(count)
    ]
    (next_ifd,) = struct.unpack_from(layout.order + ("Q" if layout.big else "I"), buf, table_end)
    return entries, next_ifd


def _read_entry(
    buf, position: int, layout: _Layout, follow: bool, depth: int, seen: set[int]
) -> _Entry:
    order, word = layout.order, ("Q" if layout.big else "I")
    tag, kind, count = struct.unpack_from(order + ("HHQ" if layout.big else "HHI"), buf, position)
    value_field = position + (12 if layout.big else 8)
    size = _TYPE_SIZES.get(kind)
    if size is None:
        return _Entry(tag, kind, count, None, position)
    length = size * count
    start = value_field
    if length > (8 if layout.big else 4):
        (start,) = struct.unpack_from(order + word, buf, value_field)
    if start + length > len(buf):
        return _Entry(tag, kind, count, None, position)
    data = bytes(buf[start : start + length])
    children = None
    if follow and tag in _SUB_IFD_TAGS and count == 1 and kind in (4, 13, 16, 18):
        child = int.from_bytes(data, "little" if order == "<" else "big")
        if child:  # 0 is the placeholder a TIFF writer leaves before the sub-IFD is appended
            children = tuple(_read_ifd(buf, child, layout, depth=depth + 1, seen=seen)[0])
    return _Entry(tag, kind, count, data, position, children)


def _entry_int(entry: _Entry, order: str) -> int | None:
    """The first value of an integer entry, or None."""
    formats = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q"}
    if entry.data is None or entry.kind not in formats or not entry.count:
        return None
    return struct.unpack_from(order + formats[entry.kind], entry.data)[0]


def _ifd_bytes(entries: Sequence[_Entry], base: int, source: str, target: str, big: bool) -> bytes:
    """Serialise a directory, its out-of-line values and its sub-directories to start at `base`.

    Values are byte-swapped from the `source` to the `target` order; offsets are absolute, so the
    result is only valid at `base` within its file (or EXIF block).
    """
    usable = [e for e in sorted(entries, key=lambda e: e.tag) if _is_writable(e, big)]
    inline, word, entry_format = (8, "Q", "HHQ") if big else (4, "I", "HHI")
    table = bytearray(struct.pack(target + ("Q" if big else "H"), len(usable)))
    tail = bytearray()
    tail_base = base + len(table) + len(usable) * (20 if big else 12) + inline
    for entry in usable:
        if entry.children is not None:
            kind, count = (16 if big else 4), 1
            offset = tail_base + _pad_even(tail)
            tail += _ifd_bytes(entry.children, offset, source, target, big)
            value = struct.pack(target + word, offset)
        else:
            kind, count = entry.kind, entry.count
            data = entry.data if source == target else _swap(entry.data, kind)  # type: ignore[arg-type]
            if len(data) <= inline:
                value = data.ljust(inline, b"\x00")
            else:
                value = struct.pack(target + word, tail_base + _pad_even(tail))
                tail += data
        table += struct.pack(target + entry_format, entry.tag, kind, count) + value
    table += bytes(inline)  # no next directory
    return bytes(table + tail)


def _is_writable(entry: _Entry, big: bool) -> bool:
    if entry.children is not None:
        return True
    return entry.data is not None and (big or entry.kind not in (16, 17, 18))


def _pad_even(tail: bytearray) -> int:
    """Pad `tail` to an even length (TIFF values start on word boundaries); return the length."""
    if len(tail) % 2:
        tail.append(0)
    return len(tail)


def _swap(data: bytes, kind: int) -> bytes:
    unit = _SWAP_UNITS.get(kind, 1)
    if unit == 1:
        return data
    return np.frombuffer(data, dtype=f"u{unit}").byteswap().tobytes()


def _exif_block(entries: Sequence[_Entry], order: str) -> bytes:
    header = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    return header + _ifd_bytes(entries, 8, order, order, big=False)


def _exif_from_tiff(entries: Sequence[_Entry], order: str) -> bytes | None:
    """Build the EXIF block of a TIFF source: its descriptive IFD0 tags plus Exif and GPS IFDs."""
    kept = [
        entry
        for entry in entries
        if (entry.tag in _TIFF_TAGS_FOR_EXIF and entry.data is not None)
        or (entry.tag in (_EXIF_IFD, _GPS_IFD) and entry.children is not None)
    ]
    return _exif_block(kept, order) if kept else None


def _exif_orientation(exif: bytes | None) -> int | None:
    if not exif:
        return None
    try:
        layout = _tiff_layout(exif)
        entries, _ = _read_ifd(exif, layout.first_ifd, layout)
    except (_ExifError, struct.error) as exc:
        _log.debug("unreadable EXIF, orientation taken as unset: %s", exc)
        return None
    for entry in entries:
        if entry.tag == 274:
            return _entry_int(entry, layout.order)
    return None


def _patch_exif(exif: bytes, width: int, height: int) -> bytes:
    """Return `exif` with Orientation 1, the new pixel dimensions and no IFD1 (thumbnail).

    Every other byte stays where it was, so maker notes and unknown tags survive untouched.
    """
    buf = bytearray(exif)
    layout = _tiff_layout(buf)
    if layout.big:
        raise _ExifError("BigTIFF-structured EXIF block")
    entries, next_ifd = _read_ifd(buf, layout.first_ifd, layout)
    updates = {274: 1, 256: width, 257: height}
    for entry in entries:
        if entry.tag in updates:
            _set_inline(buf, entry, updates[entry.tag], layout.order)
        elif entry.tag == _EXIF_IFD and entry.children:
            for child in entry.children:
                if child.tag in (0xA002, 0xA003):  # PixelXDimension, PixelYDimension
                    _set_inline(buf, child, width if child.tag == 0xA002 else height, layout.order)
    if next_ifd:
        pointer = layout.first_ifd + 2 + 12 * len(entries)
        buf = _drop_thumbnail(buf, layout, pointer, next_ifd)
    return bytes(buf)


def _set_inline(buf: bytearray, entry: _Entry, value: int, order: str) -> None:
    if entry.count != 1 or entry.kind not in (3, 4):
        raise _ExifError(f"tag {entry.tag} has type {entry.kind} and count {entry.count}")
    kind = 3 if entry.kind == 3 and value <= 0xFFFF else 4  # widen SHORT when the value needs it
    struct.pack_into(order + "H", buf, entry.position + 2, kind)
    packed = struct.pack(order + "HH", value, 0) if kind == 3 else struct.pack(order + "I", value)
    buf[entry.position + 8 : entry.position + 12] = packed


def _drop_thumbnail(buf: bytearray, layout: _Layout, pointer: int, ifd1: int) -> bytearray:
    """Unlink IFD1 and blank its JPEG thumbnail (cutting it off when it ends the block)."""
    struct.pack_into(layout.order + "I", buf, pointer, 0)
    try:
        entries, _ = _read_ifd(buf, ifd1, layout)
    except _ExifError:
        return buf  # unlinked is enough; nothing reads an orphaned directory
    values = {entry.tag: _entry_int(entry, layout.order) for entry in entries}
    start, length = values.get(513), values.get(514)  # JPEGInterchangeFormat(Length)
    # Blank only what is a JPEG past the header: a damaged offset (say 1) would otherwise
    # blank the header and IFD0, losing every tag of the photo in the output.
    if (
        start is not None
        and length
        and start >= 8
        and start + length <= len(buf)
        and buf[start : start + 2] == b"\xff\xd8"
    ):
        if start + length == len(buf):
            del buf[start:]
        else:
            buf[start : start + length] = bytes(length)
    return buf


# --- XMP -------------------------------------------------------------------------------------


def _xmp_patterns(name: bytes) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    return (
        re.compile(rb"(" + name + rb"\s*=\s*[\"'])\s*(\d+)\s*([\"'])"),
        re.compile(rb"(<" + name + rb">)\s*(\d+)\s*(</" + name + rb">)"),
    )


_XMP_FIELDS = {
    name: _xmp_patterns(name)
    for name in (
        b"tiff:Orientation",
        b"tiff:ImageWidth",
        b"tiff:ImageLength",
        b"exif:PixelXDimension",
        b"exif:PixelYDimension",
    )
}


def _xmp_orientation(xmp: bytes | None) -> int | None:
    if not xmp:
        return None
    for pattern in _XMP_FIELDS[b"tiff:Orientation"]:
        match = pattern.search(xmp)
        if match:
            return int(match.group(2))
    return None


def _patch_xmp(xmp: bytes, width: int, height: int) -> bytes:
    """Mirror the EXIF updates in the XMP packet, so no reader sees a stale rotation or size."""
    values = {
        b"tiff:Orientation": 1,
        b"tiff:ImageWidth": width,
        b"tiff:ImageLength": height,
        b"exif:PixelXDimension": width,
        b"exif:PixelYDimension": height,
    }
    for name, value in values.items():
        replacement = rb"\g<1>" + str(value).encode() + rb"\g<3>"
        for pattern in _XMP_FIELDS[name]:
            xmp = pattern.sub(replacement, xmp)
    return xmp


# --------------------------------------------------------------------------------------------
# Encoding


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
    fmt = format or image.format
    if fmt not in FORMATS:
        raise EncodeError(path, f"unknown output format {fmt!r}; expected one of {FORMATS}")
    depth = _output_depth(path, fmt, bit_depth, image.bit_depth)
    _check_encodable(path, image, fmt, quality)
    metadata = _output_metadata(path, image)
    _log_uncarried(path, fmt, image, metadata)
    try:
        _WRITERS[fmt](image, path, depth, quality, metadata)
    except EncodeError:
        raise
    except Exception as exc:  # disk full, codec failures...: all are EncodeErrors
        raise EncodeError(path, f"writing {fmt.upper()} failed: {exc}") from exc
    return fmt


def _output_depth(path: Path, fmt: str, requested: int | None, source: int) -> int:
    if fmt in ("jpeg", "webp"):
        if requested == 16:
            raise EncodeError(path, f"{fmt.upper()} holds 8-bit samples only; use PNG or TIFF")
        return 8
    depth = source if requested is None else requested
    if depth not in (8, 16):
        raise EncodeError(path, f"bit depth {depth} is not supported; use 8 or 16")
    return depth


def _check_encodable(path: Path, image: Image, fmt: str, quality: int) -> None:
    pixels, alpha = image.pixels, image.alpha
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or 0 in pixels.shape:
        raise EncodeError(path, f"pixels must be (H, W, 1 or 3), not {pixels.shape}")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise EncodeError(path, f"pixels must be floating point in [0, 1], not {pixels.dtype}")
    if alpha is not None and alpha.shape != pixels.shape[:2]:
        raise EncodeError(path, f"alpha shape {alpha.shape} does not match pixels {pixels.shape}")
    limit = {"jpeg": _JPEG_MAX_SIDE, "webp": _WEBP_MAX_SIDE, "png": _PNG_MAX_SIDE}.get(fmt)
    if limit and max(image.width, image.height) > limit:
        raise EncodeError(
            path, f"{image.width}x{image.height} exceeds {fmt.upper()}'s limit of {limit} pixels"
        )
    if not 1 <= quality <= 100:
        raise EncodeError(path, f"quality must be between 1 and 100, not {quality}")


def _output_metadata(path: Path, image: Image) -> Metadata:
    """The metadata as the output must state it: upright, at its new size, without thumbnail."""
    source = image.metadata
    exif = None
    if source.exif:
        try:
            exif = _patch_exif(source.exif, image.width, image.height)
        except (_ExifError, struct.error) as exc:
            _log.warning("%s: EXIF block dropped, it cannot be parsed safely: %s", path, exc)
    xmp = _patch_xmp(source.xmp, image.width, image.height) if source.xmp else None
    text = _patch_text(source.text, image.width, image.height)
    return replace(source, exif=exif, xmp=xmp, text=text, orientation=1)


def _patch_text(
    text: tuple[tuple[str, str], ...], width: int, height: int
) -> tuple[tuple[str, str], ...]:
    """Update the EXIF copies ImageMagick keeps as PNG text ("exif:Orientation"...) like EXIF."""
    values = {
        "exif:orientation": 1,
        "tiff:orientation": 1,
        "exif:pixelxdimension": width,
        "exif:pixelydimension": height,
    }
    return tuple(
        (key, str(values[key.lower()]) if key.lower() in values else value) for key, value in text
    )


# What each format has no place for, as (Metadata field, description).
_UNCARRIED = {
    "jpeg": (("png_colour", "PNG gAMA/cHRM/sRGB chunks"),),
    "png": (("iptc", "IPTC"),),
    "tiff": (("text", "text annotations"), ("png_colour", "PNG gAMA/cHRM/sRGB chunks")),
    "webp": (
        ("iptc", "IPTC"),
        ("text", "text annotations"),
        ("png_colour", "PNG gAMA/cHRM/sRGB chunks"),
    ),
}


def _log_uncarried(path: Path, fmt: str, image: Image, metadata: Metadata) -> None:
    lost = [label for name, label in _UNCARRIED[fmt] if getattr(metadata, name)]
    if fmt == "jpeg" and image.alpha is not None:
        lost.append("alpha channel (colour kept, transparency dropped)")
    if fmt == "jpeg" and any(key != "Comment" for key, _ in metadata.text):
        lost.append("text annotations other than a comment")
    if fmt == "webp" and metadata.dpi and _exif_dpi(metadata.exif) is None:
        lost.append("resolution (WebP keeps it only inside EXIF)")
    if fmt == "webp" and image.channels == 1:
        _log.info("%s: WebP has no greyscale mode; writing grey as RGB", path)
    if lost:
        _log.warning("%s: %s cannot hold %s; not carried", path, fmt.upper(), ", ".join(lost))


def _bands(
    image: Image, path: Path, depth: int, *, with_alpha: bool = True
) -> Iterator[np.ndarray]:
    """Yield (rows, W, C) integer bands, alpha last; source pages are released as each is read.

    Only one band is ever converted at a time, so a disk-backed np.memmap of any size is written
    in bounded memory.
    """
    dtype, scale = (np.uint16, 65535.0) if depth == 16 else (np.uint8, 255.0)
    alpha = image.alpha if with_alpha else None
    channels = image.channels + (alpha is not None)
    for start in range(0, image.height, _BAND_ROWS):
        stop = min(start + _BAND_ROWS, image.height)
        work = np.empty((stop - start, image.width, channels), dtype=np.float32)
        work[:, :, : image.channels] = image.pixels[start:stop]
        if alpha is not None:
            work[:, :, -1] = alpha[start:stop]
        release_rows(image.pixels, start, stop)
        if alpha is not None:
            release_rows(alpha, start, stop)
        if not np.isfinite(work).all():
            raise EncodeError(path, f"pixels in rows {start}-{stop - 1} are NaN or infinite")
        np.clip(work, 0.0, 1.0, out=work)
        work *= np.float32(scale)
        np.rint(work, out=work)
        yield work.astype(dtype)


def _whole(image: Image, path: Path, depth: int, *, with_alpha: bool) -> np.ndarray:
    return np.concatenate(list(_bands(image, path, depth, with_alpha=with_alpha)), axis=0)


# --- JPEG ------------------------------------------------------------------------------------


def _write_jpeg(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    # Alpha is dropped, not composited: the restored colour under it is the image's content.
    samples = _whole(image, path, 8, with_alpha=False)
    # 4:4:4 because chroma subsampling would undo part of a restoration's colour work.
    options: dict[str, object] = {"quality": quality, "subsampling": 0, "optimize": True}
    segments = _jpeg_metadata_options(path, meta)
    options.update(segments)
    picture = PILImage.fromarray(samples[:, :, 0] if image.channels == 1 else samples)
    picture.save(path, "JPEG", **options)


def _jpeg_metadata_options(path: Path, meta: Metadata) -> dict[str, object]:
    options: dict[str, object] = {}
    if meta.icc_profile:
        options["icc_profile"] = meta.icc_profile
    if meta.exif:
        if len(meta.exif) + 6 > _JPEG_MAX_SEGMENT:
            raise EncodeError(path, f"EXIF block of {len(meta.exif)} bytes exceeds a JPEG APP1")
        options["exif"] = b"Exif\x00\x00" + meta.exif
    if meta.xmp:
        if len(meta.xmp) + 29 > _JPEG_MAX_SEGMENT:
            raise EncodeError(path, f"XMP packet of {len(meta.xmp)} bytes exceeds a JPEG APP1")
        options["xmp"] = meta.xmp
    if meta.iptc:
        options["extra"] = _photoshop_iptc_segment(path, meta.iptc)
    comments = [text for key, text in meta.text if key == "Comment"]
    if comments:
        options["comment"] = "\n".join(comments).encode("utf-8")
    if meta.dpi:
        options["dpi"] = tuple(round(v) for v in meta.dpi)
    return options


def _photoshop_iptc_segment(path: Path, iptc: bytes) -> bytes:
    """An APP13 segment holding the IPTC records as Photoshop image resource 0x0404."""
    padding = b"\x00" * (len(iptc) % 2)
    resource = b"8BIM" + struct.pack(">HHI", 0x0404, 0, len(iptc)) + iptc + padding
    body = b"Photoshop 3.0\x00" + resource
    if len(body) > _JPEG_MAX_SEGMENT:
        raise EncodeError(path, f"IPTC block of {len(iptc)} bytes exceeds a JPEG APP13")
    return b"\xff\xed" + struct.pack(">H", len(body) + 2) + body


# --- PNG -------------------------------------------------------------------------------------

_PNG_COLOUR_TYPES = {(1, False): 0, (1, True): 4, (3, False): 2, (3, True): 6}


def _write_png(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    """Write PNG ourselves: 8/16-bit grey, grey+alpha, RGB, RGBA streamed band by band.

    Neither Pillow (no 16-bit RGB) nor OpenCV (no grey+alpha, no metadata) covers every case.
    """
    colour_type = _PNG_COLOUR_TYPES[(image.channels, image.alpha is not None)]
    header = struct.pack(">IIBBBBB", image.width, image.height, depth, colour_type, 0, 0, 0)
    compressor = zlib.compressobj(level=6)
    previous: np.ndarray | None = None
    with path.open("wb") as out:
        out.write(_PNG_SIGNATURE + _png_chunk(b"IHDR", header))
        for chunk in _png_metadata_chunks(path, meta):
            out.write(chunk)
        for band in _bands(image, path, depth):
            rows = np.ascontiguousarray(band, dtype=">u2" if depth == 16 else np.uint8)
            rows = rows.view(np.uint8).reshape(band.shape[0], -1)
            compressed = compressor.compress(
                _paeth_filter(rows, previous, band.shape[2] * depth // 8)
            )
            previous = rows[-1]
            if compressed:
                out.write(_png_chunk(b"IDAT", compressed))
        out.write(_png_chunk(b"IDAT", compressor.flush()) + _png_chunk(b"IEND", b""))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth_filter(rows: np.ndarray, previous: np.ndarray | None, bpp: int) -> bytes:
    """Apply PNG filter 4 (Paeth) to every row, vectorised: encoding only reads raw bytes."""
    raw = rows.astype(np.int16)
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    if previous is not None:
        up[0] = previous
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    upleft = np.zeros_like(raw)
    upleft[:, bpp:] = up[:, :-bpp]
    near_left = np.abs(up - upleft)
    near_up = np.abs(left - upleft)
    near_upleft = np.abs(left + up - 2 * upleft)
    predictor = np.where(
        (near_left <= near_up) & (near_left <= near_upleft),
        left,
        np.where(near_up <= near_upleft, up, upleft),
    )
    filtered = np.empty((raw.shape[0], raw.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 4
    filtered[:, 1:] = (raw - predictor).astype(np.uint8)  # wraps modulo 256, as PNG requires
    return filtered.tobytes()


def _png_metadata_chunks(path: Path, meta: Metadata) -> Iterator[bytes]:
    if meta.icc_profile:
        yield _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(meta.icc_profile))
    for name, body in meta.png_colour:
        if not (name == "sRGB" and meta.icc_profile):  # the PNG spec forbids sRGB beside iCCP
            yield _png_chunk(name.encode("ascii"), body)
    if meta.dpi:
        per_metre = (round(v / 0.0254) for v in meta.dpi)
        yield _png_chunk(b"pHYs", struct.pack(">IIB", *per_metre, 1))
    if meta.exif:
        yield _png_chunk(b"eXIf", meta.exif)
    if meta.xmp:
        yield _png_chunk(b"iTXt", _XMP_KEYWORD.encode() + b"\x00" * 5 + meta.xmp)
    for keyword, text in meta.text:
        chunk = _png_text_chunk(keyword, text)
        if chunk is None:
            _log.warning("%s: text %r not written: not a valid PNG keyword", path, keyword)
        else:
            yield chunk


def _png_text_chunk(keyword: str, text: str) -> bytes | None:
    try:
        key = keyword.encode("latin-1")
    except UnicodeEncodeError:
        return None
    if not 1 <= len(key) <= 79 or b"\x00" in key:
        return None
    try:
        return _png_chunk(b"tEXt", key + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", key + b"\x00" * 5 + text.encode("utf-8", "replace"))


# --- TIFF ------------------------------------------------------------------------------------


def _write_tiff(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    """Write a tiled (256x256), Deflate-compressed TIFF with a horizontal predictor.

    Deflate + predictor is lossless and read by libtiff, Photoshop, GIMP and ImageMagick; tiles
    let us feed tifffile one band of rows at a time. BigTIFF is chosen when 4 GB could be passed.
    """
    has_alpha = image.alpha is not None
    channels = image.channels + int(has_alpha)
    ifd0_tags, sub_ifds, exif_order = _tiff_exif_parts(meta.exif)
    big = _needs_bigtiff(image, channels, depth, meta)
    with tifffile.TiffWriter(path, bigtiff=big, byteorder="<") as writer:
        writer.write(
            _tiff_tiles(image, path, depth),
            shape=(image.height, image.width) + ((channels,) if channels > 1 else ()),
            dtype=np.uint16 if depth == 16 else np.uint8,
            photometric="rgb" if image.channels == 3 else "minisblack",
            extrasamples=("unassalpha",) if has_alpha else None,
            tile=(_BAND_ROWS, _BAND_ROWS),
            compression="zlib",
            predictor=True,
            iccprofile=meta.icc_profile,
            resolution=meta.dpi,
            resolutionunit="INCH" if meta.dpi else None,
            software=False,
            metadata=None,
            buffersize=_TIFF_BUFFER_BYTES,  # the default (512 MiB) would keep many bands alive
            extratags=ifd0_tags + _tiff_blob_tags(meta),
        )
    if sub_ifds:
        _append_sub_ifds(path, sub_ifds, exif_order)


def _tiff_tiles(image: Image, path: Path, depth: int) -> Iterator[np.ndarray]:
    for band in _bands(image, path, depth):
        if band.shape[2] == 1:
            band = band[:, :, 0]
        for left in range(0, image.width, _BAND_ROWS):
            yield band[:, left : left + _BAND_ROWS]


def _needs_bigtiff(image: Image, channels: int, depth: int, meta: Metadata) -> bool:
    raw = image.width * image.height * channels * depth // 8
    extra = sum(len(block or b"") for block in (meta.exif, meta.xmp, meta.iptc, meta.icc_profile))
    # Deflate can grow incompressible data slightly; keep a generous margin below 4 GiB.
    return raw + raw // 64 + extra + (1 << 24) >= _CLASSIC_TIFF_LIMIT


def _tiff_exif_parts(exif: bytes | None) -> tuple[list[tuple], dict[int, tuple[_Entry, ...]], str]:
    """Split a (patched) EXIF block into IFD0 tags for tifffile and sub-IFDs to append."""
    if not exif:
        return [], {}, "<"
    layout = _tiff_layout(exif)
    entries, _ = _read_ifd(exif, layout.first_ifd, layout)
    tags: list[tuple] = []
    sub_ifds: dict[int, tuple[_Entry, ...]] = {}
    for entry in entries:
        if entry.tag in (_EXIF_IFD, _GPS_IFD) and entry.children is not None:
            sub_ifds[entry.tag] = entry.children
        elif entry.tag not in _TIFF_STRUCTURE_TAGS | _SUB_IFD_TAGS and entry.data is not None:
            tags.append(_tifffile_tag(entry, layout.order))
    return tags, sub_ifds, layout.order


# struct formats of TIFF field types holding numbers; byte-like types are passed as bytes.
_NUMBER_FORMATS = {3: "H", 4: "I", 5: "I", 8: "h", 9: "i", 10: "i", 11: "f", 12: "d", 13: "I"}
_NUMBER_FORMATS.update({16: "Q", 17: "q", 18: "Q"})


def _tifffile_tag(entry: _Entry, order: str) -> tuple:
    """An extratags tuple for tifffile; numbers are unpacked for tifffile to pack in file order."""
    assert entry.data is not None
    number = _NUMBER_FORMATS.get(entry.kind)
    if number is None:
        return (entry.tag, entry.kind, entry.count, entry.data, True)
    values = struct.unpack(
        f"{order}{len(entry.data) // struct.calcsize(number)}{number}", entry.data
    )
    return (entry.tag, entry.kind, entry.count, values, True)


def _tiff_blob_tags(meta: Metadata) -> list[tuple]:
    tags: list[tuple] = []
    if meta.xmp:
        tags.append((700, 1, len(meta.xmp), meta.xmp, True))  # XMP: BYTE, per the XMP spec
    if meta.iptc:
        tags.append((33723, 7, len(meta.iptc), meta.iptc, True))  # IPTC, kept as raw bytes
    return tags


def _append_sub_ifds(path: Path, sub_ifds: dict[int, tuple[_Entry, ...]], source: str) -> None:
    """Append the Exif/GPS directories and a new IFD0 pointing at them to a written TIFF.

    tifffile refuses to write Exif/GPS pointer tags, so IFD0 is rewritten at the end of the
    file: its entries are copied verbatim (their values stay where tifffile put them), the
    pointers are added, and the header is pointed at the new table. The old table (a few
    hundred bytes) is left unreferenced.
    """
    with path.open("r+b") as handle:
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            layout = _tiff_layout(buf)
            entries, next_ifd = _read_ifd(buf, layout.first_ifd, layout, follow=False)
            size = 20 if layout.big else 12
            table = {e.tag: bytes(buf[e.position : e.position + size]) for e in entries}
        word = layout.order + ("Q" if layout.big else "I")
        entry_format = layout.order + ("HHQ" if layout.big else "HHI")
        for tag, children in sub_ifds.items():
            offset = _seek_end_aligned(handle)
            handle.write(_ifd_bytes(children, offset, source, layout.order, layout.big))
            pointer = struct.pack(entry_format, tag, 16 if layout.big else 4, 1)
            table[tag] = pointer + struct.pack(word, offset)
        offset = _seek_end_aligned(handle)
        handle.write(struct.pack(layout.order + ("Q" if layout.big else "H"), len(table)))
        handle.write(b"".join(table[tag] for tag in sorted(table)) + struct.pack(word, next_ifd))
        handle.seek(8 if layout.big else 4)
        handle.write(struct.pack(word, offset))


def _seek_end_aligned(handle: io.BufferedRandom) -> int:
    """Move to the end of the file, padded to a multiple of 8; return that offset."""
    end = handle.seek(0, os.SEEK_END)
    handle.write(bytes(-end % 8))
    return end + (-end % 8)


# --- WebP ------------------------------------------------------------------------------------


def _write_webp(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    samples = _whole(image, path, 8, with_alpha=True)
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


_WRITERS: dict[str, Callable[[Image, Path, int, int, Metadata], None]] = {
    "jpeg": _write_jpeg,
    "png": _write_png,
    "tiff": _write_tiff,
    "webp": _write_webp,
}
