"""The metadata carry rules: which metadata of a source survives into an output, and how it is
restated there (EXIF patched in place, XMP and ImageMagick text mirrored, no thumbnail), with a
warning for what the output format has no place for."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pipeline.image import tags, xmp
from pipeline.image.declarations import exif_dpi
from pipeline.image.directory import (
    DirectoryError,
    Entry,
    Layout,
    entry_int,
    exif_block,
    read_header,
    read_ifd,
)
from pipeline.image.values import Image, Metadata

__all__ = ["exif_from_tiff", "log_uncarried", "output_metadata", "strip_exif_prefix"]

_log = logging.getLogger(__name__)

_EXIF_PREFIX = b"Exif\x00\x00"  # what JPEG APP1 (and some writers elsewhere) put before EXIF

# IFD0 tags of a TIFF source that are EXIF metadata rather than image structure or private blobs
# (Photoshop layers, ImageJ data...). Only these enter the EXIF we carry to other formats.
_TIFF_TAGS_FOR_EXIF = frozenset(
    {tags.DOCUMENT_NAME, tags.IMAGE_DESCRIPTION, tags.MAKE, tags.MODEL, tags.ORIENTATION}
    | {tags.X_RESOLUTION, tags.Y_RESOLUTION, tags.PAGE_NAME, tags.RESOLUTION_UNIT, tags.SOFTWARE}
    | {tags.DATE_TIME, tags.ARTIST, tags.HOST_COMPUTER, tags.WHITE_POINT, tags.COPYRIGHT}
    | {tags.PRIMARY_CHROMATICITIES, tags.RATING, tags.RATING_PERCENT, tags.XP_TITLE}
    | {tags.XP_COMMENT, tags.XP_AUTHOR, tags.XP_KEYWORDS, tags.XP_SUBJECT}
)

# What each format has no place for, as (Metadata field, description).
_PNG_COLOUR = ("png_colour", "PNG gAMA/cHRM/sRGB chunks")
_UNCARRIED = {
    "jpeg": (_PNG_COLOUR,),
    "png": (("iptc", "IPTC"),),
    "tiff": (("text", "text annotations"), _PNG_COLOUR),
    "webp": (("iptc", "IPTC"), ("text", "text annotations"), _PNG_COLOUR),
}


def strip_exif_prefix(exif: bytes | None) -> bytes | None:
    """The EXIF block as we carry it: the bare TIFF structure, without an "Exif\\0\\0" prefix."""
    if exif and exif.startswith(_EXIF_PREFIX):
        exif = exif[len(_EXIF_PREFIX) :]
    return bytes(exif) if exif else None


def exif_from_tiff(entries: Sequence[Entry], order: str) -> bytes | None:
    """Build the EXIF block of a TIFF source: its descriptive IFD0 tags plus Exif and GPS IFDs."""
    kept = [
        entry
        for entry in entries
        if (entry.tag in _TIFF_TAGS_FOR_EXIF and entry.data is not None)
        or (entry.tag in (tags.EXIF_IFD, tags.GPS_IFD) and entry.children is not None)
    ]
    return exif_block(kept, order) if kept else None


def output_metadata(path: Path, image: Image) -> Metadata:
    """The metadata as the output must state it: upright, at its new size, without thumbnail."""
    source = image.metadata
    exif = None
    if source.exif:
        try:
            exif = _patch_exif(source.exif, image.width, image.height)
        except (DirectoryError, struct.error) as exc:
            _log.warning("%s: EXIF block dropped, it cannot be parsed safely: %s", path, exc)
    packet = _patch_xmp(source.xmp, image.width, image.height) if source.xmp else None
    text = _patch_text(source.text, image.width, image.height)
    return replace(source, exif=exif, xmp=packet, text=text, orientation=1)


def _patch_exif(exif: bytes, width: int, height: int) -> bytes:
    """Return `exif` with Orientation 1, the new pixel dimensions and no IFD1 (thumbnail).

    Every other byte stays where it was, so maker notes and unknown tags survive untouched.
    """
    buf = bytearray(exif)
    layout = read_header(buf)
    if layout.big:
        raise DirectoryError("BigTIFF-structured EXIF block")
    entries, next_ifd = read_ifd(buf, layout.first_ifd, layout)
    updates = {tags.ORIENTATION: 1, tags.IMAGE_WIDTH: width, tags.IMAGE_LENGTH: height}
    sizes = {tags.PIXEL_X_DIMENSION: width, tags.PIXEL_Y_DIMENSION: height}
    for entry in entries:
        if entry.tag in updates:
            _set_inline(buf, entry, updates[entry.tag], layout.order)
        elif entry.tag == tags.EXIF_IFD and entry.children:
            for child in entry.children:
                if child.tag in sizes:
                    _set_inline(buf, child, sizes[child.tag], layout.order)
    if next_ifd:
        pointer = layout.first_ifd + 2 + layout.entry_size * len(entries)
        buf = _drop_thumbnail(buf, layout, pointer, next_ifd)
    return bytes(buf)


def _set_inline(buf: bytearray, entry: Entry, value: int, order: str) -> None:
    if entry.count != 1 or entry.kind not in (tags.SHORT, tags.LONG):
        raise DirectoryError(f"tag {entry.tag} has type {entry.kind} and count {entry.count}")
    # widen SHORT when the value needs it
    kind = tags.SHORT if entry.kind == tags.SHORT and value <= 0xFFFF else tags.LONG
    struct.pack_into(order + "H", buf, entry.position + 2, kind)
    packed = (
        struct.pack(order + "HH", value, 0)
        if kind == tags.SHORT
        else struct.pack(order + "I", value)
    )
    buf[entry.position + 8 : entry.position + 12] = packed


def _drop_thumbnail(buf: bytearray, layout: Layout, pointer: int, ifd1: int) -> bytearray:
    """Unlink IFD1 and blank its JPEG thumbnail (cutting it off when it ends the block)."""
    struct.pack_into(layout.order + "I", buf, pointer, 0)
    try:
        entries, _ = read_ifd(buf, ifd1, layout)
    except DirectoryError:
        return buf  # unlinked is enough; nothing reads an orphaned directory
    values = {entry.tag: entry_int(entry, layout.order) for entry in entries}
    start = values.get(tags.JPEG_INTERCHANGE_FORMAT)
    length = values.get(tags.JPEG_INTERCHANGE_FORMAT_LENGTH)
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


def _patch_xmp(packet: bytes, width: int, height: int) -> bytes:
    """Mirror the EXIF updates in the XMP packet, so no reader sees a stale rotation or size."""
    values = {
        xmp.ORIENTATION: 1,
        xmp.IMAGE_WIDTH: width,
        xmp.IMAGE_LENGTH: height,
        xmp.PIXEL_X_DIMENSION: width,
        xmp.PIXEL_Y_DIMENSION: height,
    }
    return xmp.replace_ints(packet, values)


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


def log_uncarried(path: Path, fmt: str, image: Image, metadata: Metadata) -> None:
    """Warn, in one line, of everything in `metadata` (and alpha) that format `fmt` cannot hold."""
    lost = [label for name, label in _UNCARRIED[fmt] if getattr(metadata, name)]
    if fmt == "jpeg" and image.alpha is not None:
        lost.append("alpha channel (colour kept, transparency dropped)")
    if fmt == "jpeg" and any(key != "Comment" for key, _ in metadata.text):
        lost.append("text annotations other than a comment")
    if fmt == "webp" and metadata.dpi and exif_dpi(metadata.exif) is None:
        lost.append("resolution (WebP keeps it only inside EXIF)")
    if fmt == "webp" and image.channels == 1:
        _log.info("%s: WebP has no greyscale mode; writing grey as RGB", path)
    if lost:
        _log.warning("%s: %s cannot hold %s; not carried", path, fmt.upper(), ", ".join(lost))
