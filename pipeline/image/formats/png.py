"""PNG: a decoder that verifies every chunk and CRC before libpng decodes, and our own writer
(8/16-bit grey, grey+alpha, RGB, RGBA) streaming band by band with the metadata chunks."""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import imagecodecs
import numpy as np

from pipeline.errors import DecodeError, UnsupportedImageError
from pipeline.image.banding import bands
from pipeline.image.declarations import declared_orientation, exif_dpi
from pipeline.image.metadata import strip_exif_prefix
from pipeline.image.plugin import Decoded, Format, check_pixel_count, library_errors, read_file
from pipeline.image.values import Image, Metadata

__all__ = ["FORMAT"]

_log = logging.getLogger(__name__)

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_SIDE = 2**31 - 1
_MAX_TEXT_BYTES = 1 << 20  # a PNG text chunk inflating past this is a bomb (Pillow's limit)
_MAX_PROFILE_BYTES = 16 << 20  # same guard for ICC profiles and XMP packets
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_COLOUR_CHUNKS = {b"gAMA", b"cHRM", b"sRGB", b"cICP"}
_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
_XMP_KEYWORD = "XML:com.adobe.xmp"
_COLOUR_TYPES = {(1, False): 0, (1, True): 4, (3, False): 2, (3, True): 6}


class _Header(NamedTuple):
    width: int
    height: int
    depth: int
    colour_type: int


def _decode(path: Path, max_pixels: int) -> Decoded:
    data = read_file(path)
    chunks = _chunks(path, data)
    header = _header(path, next(chunks, None))
    check_pixel_count(path, header.width, header.height, max_pixels)
    metadata = _metadata(path, chunks)  # structural damage is reported before refusals
    _check_stream_end(path, data)
    if header.colour_type == 0 and header.depth == 1:
        raise UnsupportedImageError(path, "1-bit bilevel PNG: restoration needs continuous tone")
    # Every chunk and CRC is verified above; libpng (via imagecodecs) then rejects bad zlib data,
    # bad filters and short image data, and keeps 16-bit samples, tRNS and grey+alpha exactly.
    with library_errors(path, "damaged PNG image data"):
        samples = imagecodecs.png_decode(data)
    expected_dtype = np.uint16 if header.depth == 16 else np.uint8
    if samples.shape[:2] != (header.height, header.width) or samples.dtype != expected_dtype:
        raise DecodeError(path, f"PNG decoded to {samples.shape} {samples.dtype}, not its header")
    has_alpha = samples.ndim == 3 and samples.shape[2] in (2, 4)
    return Decoded(samples, has_alpha, 16 if header.depth == 16 else 8, metadata)


def _check_stream_end(path: Path, data: bytes) -> None:
    """Refuse image data that goes on after the compressed stream ends (libpng only warns):
    the file was damaged or spliced, and which part is the image cannot be known."""
    inflater = zlib.decompressobj()
    idat = (body for kind, body in _chunks(path, data) if kind == b"IDAT")
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


def _chunks(path: Path, data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (type, payload) for every chunk up to IEND, verifying lengths and CRCs."""
    view = memoryview(data)
    pos = len(_SIGNATURE)
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


def _header(path: Path, chunk: tuple[bytes, memoryview] | None) -> _Header:
    if chunk is None or chunk[0] != b"IHDR" or len(chunk[1]) != 13:
        raise DecodeError(path, "PNG does not start with a valid IHDR chunk")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunk[1]
    )
    if not (width and height) or depth not in _DEPTHS.get(colour, ()):
        raise DecodeError(
            path, f"PNG header is invalid ({width}x{height}, {depth}-bit type {colour})"
        )
    if compression or filtering or interlace > 1:
        raise DecodeError(path, "PNG header names an unknown compression, filter or interlace")
    return _Header(width, height, depth, colour)


def _metadata(path: Path, chunks: Iterator[tuple[bytes, memoryview]]) -> Metadata:
    """Consume the chunks after IHDR, checking their order and collecting what we carry."""
    found = _Collected(path)
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
class _Collected:
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
            self.icc_profile = _iccp(self.path, body)
        elif kind == b"eXIf":
            self.exif = strip_exif_prefix(bytes(body))
        elif kind == b"pHYs":
            self.dpi = _dpi(body)
        elif kind in _COLOUR_CHUNKS:
            self.colour.append((kind.decode("ascii"), bytes(body)))
        elif kind in _TEXT_CHUNKS:
            self.add_text(kind, body)

    def add_text(self, kind: bytes, body: memoryview) -> None:
        keyword, value = _text(self.path, kind, body)
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
            dpi=self.dpi or exif_dpi(exif),
            orientation=declared_orientation(exif, self.xmp),
            text=tuple(self.text),
            png_colour=tuple(self.colour),
        )


def _iccp(path: Path, body: memoryview) -> bytes:
    _, _, rest = bytes(body).partition(b"\x00")
    if not rest or rest[0] != 0:
        raise DecodeError(path, "PNG iCCP chunk is malformed")
    return _inflate(path, rest[1:], _MAX_PROFILE_BYTES, "PNG iCCP profile")


def _dpi(body: memoryview) -> tuple[float, float] | None:
    if len(body) != 9:
        return None
    x, y, unit = struct.unpack(">IIB", body)
    return (x * 0.0254, y * 0.0254) if unit == 1 and x and y else None


def _text(path: Path, kind: bytes, body: memoryview) -> tuple[str, bytes]:
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
        return strip_exif_prefix(bytes.fromhex("".join(value.decode("ascii").split("\n")[3:])))
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


def _write(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    """Write PNG ourselves: 8/16-bit grey, grey+alpha, RGB, RGBA streamed band by band.

    Neither Pillow (no 16-bit RGB) nor OpenCV (no grey+alpha, no metadata) covers every case.
    """
    colour_type = _COLOUR_TYPES[(image.channels, image.alpha is not None)]
    header = struct.pack(">IIBBBBB", image.width, image.height, depth, colour_type, 0, 0, 0)
    compressor = zlib.compressobj(level=6)
    previous: np.ndarray | None = None
    with path.open("wb") as out:
        out.write(_SIGNATURE + _chunk(b"IHDR", header))
        for chunk in _metadata_chunks(path, meta):
            out.write(chunk)
        for band in bands(image, path, depth):
            rows = np.ascontiguousarray(band, dtype=">u2" if depth == 16 else np.uint8)
            rows = rows.view(np.uint8).reshape(band.shape[0], -1)
            compressed = compressor.compress(
                _paeth_filter(rows, previous, band.shape[2] * depth // 8)
            )
            previous = rows[-1]
            if compressed:
                out.write(_chunk(b"IDAT", compressed))
        out.write(_chunk(b"IDAT", compressor.flush()) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, body: bytes) -> bytes:
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


def _metadata_chunks(path: Path, meta: Metadata) -> Iterator[bytes]:
    if meta.icc_profile:
        yield _chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(meta.icc_profile))
    for name, body in meta.png_colour:
        if not (name == "sRGB" and meta.icc_profile):  # the PNG spec forbids sRGB beside iCCP
            yield _chunk(name.encode("ascii"), body)
    if meta.dpi:
        per_metre = (round(v / 0.0254) for v in meta.dpi)
        yield _chunk(b"pHYs", struct.pack(">IIB", *per_metre, 1))
    if meta.exif:
        yield _chunk(b"eXIf", meta.exif)
    if meta.xmp:
        yield _chunk(b"iTXt", _XMP_KEYWORD.encode() + b"\x00" * 5 + meta.xmp)
    for keyword, text in meta.text:
        chunk = _text_chunk(keyword, text)
        if chunk is None:
            _log.warning("%s: text %r not written: not a valid PNG keyword", path, keyword)
        else:
            yield chunk


def _text_chunk(keyword: str, text: str) -> bytes | None:
    try:
        key = keyword.encode("latin-1")
    except UnicodeEncodeError:
        return None
    if not 1 <= len(key) <= 79 or b"\x00" in key:
        return None
    try:
        return _chunk(b"tEXt", key + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key + b"\x00" * 5 + text.encode("utf-8", "replace"))


FORMAT = Format(
    name="png",
    suffix=".png",
    aliases=(),
    matches=lambda head: head.startswith(_SIGNATURE),
    decode=_decode,
    write=_write,
    max_side=_MAX_SIDE,
)
