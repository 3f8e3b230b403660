"""JPEG: a strict decoder (header walk, libjpeg-turbo refusing corrupt data) and a 4:4:4 writer
carrying ICC, EXIF, XMP, IPTC, comments and density in their APPn/COM segments."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import NamedTuple

import simplejpeg
from PIL import Image as PILImage
from PIL import JpegImagePlugin

from pipeline.errors import DecodeError, EncodeError, UnsupportedImageError
from pipeline.image.banding import whole
from pipeline.image.declarations import declared_orientation, exif_dpi
from pipeline.image.metadata import strip_exif_prefix
from pipeline.image.plugin import Decoded, Format, check_pixel_count, library_errors, read_file
from pipeline.image.values import Image, Metadata

__all__ = ["FORMAT"]

_MAX_SIDE = 65500  # libjpeg-turbo's JPEG_MAX_DIMENSION
_MAX_SEGMENT = 65533  # payload bytes of one APPn marker segment
_IPTC_RESOURCE = 0x0404  # the Photoshop image resource holding IPTC-IIM records

_SOI_PREFIX = b"\xff\xd8\xff"
_EOI, _SOS, _APP13 = 0xD9, 0xDA, 0xED
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_SOF_REFUSED = {
    0xC3: "lossless JPEG",
    0xC5: "hierarchical JPEG",
    0xC6: "hierarchical JPEG",
    0xC7: "lossless hierarchical JPEG",
    0xCB: "lossless arithmetic-coded JPEG",
    0xCD: "hierarchical arithmetic-coded JPEG",
    0xCE: "hierarchical arithmetic-coded JPEG",
    0xCF: "lossless hierarchical arithmetic-coded JPEG",
}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length


class _Frame(NamedTuple):
    width: int
    height: int
    components: int
    stream: bytes  # the file with stray bytes between header segments removed


def _decode(path: Path, max_pixels: int) -> Decoded:
    data = read_file(path)
    frame = _frame(path, data)
    check_pixel_count(path, frame.width, frame.height, max_pixels)
    metadata = _metadata(path, frame.stream)
    colorspace = "GRAY" if frame.components == 1 else "RGB"
    try:
        # Strict: libjpeg's "corrupt data" warnings mean blocks were zero-filled or resynchronised,
        # which Pillow and OpenCV return as an image; we refuse them. (Same libjpeg-turbo and
        # settings as Pillow, so pixels are identical to Pillow's for intact files.)
        samples = simplejpeg.decode_jpeg(frame.stream, colorspace=colorspace, strict=True)
    except Exception as exc:  # ValueError for damage; anything else is damage too
        raise DecodeError(path, f"damaged JPEG data: {exc}") from exc
    return Decoded(samples, has_alpha=False, bit_depth=8, metadata=metadata)


def _frame(path: Path, data: bytes) -> _Frame:
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
        marker, pos = _next_marker(path, data, pos)
        stray = data[expected : pos - 2].lstrip(b"\xff")  # 0xFF fill bytes are legal
        if stray:
            raise DecodeError(
                path,
                f"damaged JPEG header: {len(stray)} stray bytes before marker 0xFF{marker:02X} "
                f"at byte {pos - 2} (a segment length is wrong)",
            )
        if marker in _STANDALONE:
            parts.append(bytes((0xFF, marker)))
            continue
        if marker == _EOI:
            raise DecodeError(path, "JPEG ends (EOI) before any image data")
        end = _segment_end(path, data, pos, marker)
        parts.append(bytes((0xFF, marker)) + data[pos:end])
        if marker in _SOF:
            frame = _sof(path, marker, data[pos + 2 : end])
        pos = end
        if marker == _SOS:
            break
    if frame is None:
        raise DecodeError(path, "JPEG has scan data but no frame header (SOF)")
    parts.append(data[pos:])
    return _Frame(*frame, stream=b"".join(parts))


def _next_marker(path: Path, data: bytes, pos: int) -> tuple[int, int]:
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            raise DecodeError(path, "JPEG is truncated: the header ends before the image data")
        marker = data[pos + 1]
        if marker not in (0x00, 0xFF):  # 0xFF is fill before a marker; 0x00 is not a marker
            return marker, pos + 2
        pos += 1


def _segment_end(path: Path, data: bytes, pos: int, marker: int) -> int:
    if pos + 2 > len(data):
        raise DecodeError(path, f"JPEG is truncated inside marker 0xFF{marker:02X}")
    end = pos + int.from_bytes(data[pos : pos + 2], "big")
    if end < pos + 2 or end > len(data):
        raise DecodeError(path, f"JPEG marker segment 0xFF{marker:02X} runs past the end of file")
    return end


def _sof(path: Path, marker: int, body: bytes) -> tuple[int, int, int]:
    if marker in _SOF_REFUSED:
        raise UnsupportedImageError(
            path, f"{_SOF_REFUSED[marker]}: this coding process cannot be decoded here"
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


def _metadata(path: Path, stream: bytes) -> Metadata:
    # Pillow's lazy open parses the APPn/COM segments (multi-segment ICC, Photoshop resources,
    # JFIF density) without decoding pixels. The plugin class is used directly, not
    # Image.open: its decompression-bomb check reads the process-wide MAX_IMAGE_PIXELS, which
    # would override the caller's max_pixels (already enforced above from our own header walk).
    with (
        library_errors(path, "unreadable JPEG header"),
        JpegImagePlugin.JpegImageFile(io.BytesIO(stream)) as im,
    ):
        info = dict(im.info)
    exif = strip_exif_prefix(info.get("exif"))
    xmp = info.get("xmp") or None
    comment = info.get("comment")
    photoshop = info.get("photoshop") or {}
    return Metadata(
        icc_profile=info.get("icc_profile") or None,
        exif=exif,
        xmp=xmp,
        iptc=photoshop.get(_IPTC_RESOURCE) or None,
        dpi=_jfif_dpi(info) or exif_dpi(exif),
        orientation=declared_orientation(exif, xmp),
        text=(("Comment", comment.decode("utf-8", "replace")),) if comment else (),
    )


def _jfif_dpi(info: dict) -> tuple[float, float] | None:
    # Only a JFIF density with a real unit; Pillow's own "dpi" falls back to an invented 72.
    factor = {1: 1.0, 2: 2.54}.get(info.get("jfif_unit", 0))
    density = info.get("jfif_density")
    if factor is None or not density or not all(density):
        return None
    return density[0] * factor, density[1] * factor


def _write(image: Image, path: Path, depth: int, quality: int, meta: Metadata) -> None:
    # Alpha is dropped, not composited: the restored colour under it is the image's content.
    samples = whole(image, path, 8, with_alpha=False)
    # 4:4:4 because chroma subsampling would undo part of a restoration's colour work.
    options: dict[str, object] = {"quality": quality, "subsampling": 0, "optimize": True}
    segments = _metadata_options(path, meta)
    options.update(segments)
    picture = PILImage.fromarray(samples[:, :, 0] if image.channels == 1 else samples)
    picture.save(path, "JPEG", **options)


def _metadata_options(path: Path, meta: Metadata) -> dict[str, object]:
    options: dict[str, object] = {}
    if meta.icc_profile:
        options["icc_profile"] = meta.icc_profile
    if meta.exif:
        if len(meta.exif) + 6 > _MAX_SEGMENT:
            raise EncodeError(path, f"EXIF block of {len(meta.exif)} bytes exceeds a JPEG APP1")
        options["exif"] = b"Exif\x00\x00" + meta.exif
    if meta.xmp:
        if len(meta.xmp) + 29 > _MAX_SEGMENT:
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
    resource = b"8BIM" + struct.pack(">HHI", _IPTC_RESOURCE, 0, len(iptc)) + iptc + padding
    body = b"Photoshop 3.0\x00" + resource
    if len(body) > _MAX_SEGMENT:
        raise EncodeError(path, f"IPTC block of {len(iptc)} bytes exceeds a JPEG APP13")
    return bytes((0xFF, _APP13)) + struct.pack(">H", len(body) + 2) + body


FORMAT = Format(
    name="jpeg",
    suffix=".jpg",
    aliases=("jpg",),
    matches=lambda head: head.startswith(_SOI_PREFIX),
    decode=_decode,
    write=_write,
    max_side=_MAX_SIDE,
    eight_bit_only=True,
)
