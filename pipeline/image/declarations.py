"""What a file's metadata declares about its pixels: the orientation (EXIF, else XMP) and the
resolution (EXIF or TIFF tags), and whether its EXIF block can be trusted at all."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from pipeline.errors import DecodeError
from pipeline.image import tags, xmp
from pipeline.image.directory import DirectoryError, Entry, entry_int, read_header, read_ifd

__all__ = ["check_exif", "declared_orientation", "exif_dpi", "tiff_dpi"]

_log = logging.getLogger(__name__)

_INCH, _CENTIMETRE = 2, 3  # ResolutionUnit values; 1 is "no absolute unit"


def check_exif(path: Path, exif: bytes | None) -> None:
    """Refuse an EXIF block we cannot parse: carrying it blind or dropping it silently would
    both lose the photo's metadata, and its orientation could not be trusted either."""
    if not exif:
        return
    try:
        layout = read_header(exif)
        read_ifd(exif, layout.first_ifd, layout)
    except (DirectoryError, struct.error) as exc:
        raise DecodeError(path, f"malformed EXIF block: {exc}") from exc


def declared_orientation(exif: bytes | None, packet: bytes | None) -> int:
    """EXIF Orientation, else XMP tiff:Orientation (the MWG order), else 1; invalid values are 1."""
    value = _exif_orientation(exif)
    if value is None:
        value = xmp.read_int(packet, xmp.ORIENTATION)
    return value if value in range(1, 9) else 1


def _exif_orientation(exif: bytes | None) -> int | None:
    if not exif:
        return None
    try:
        layout = read_header(exif)
        entries, _ = read_ifd(exif, layout.first_ifd, layout)
    except (DirectoryError, struct.error) as exc:
        _log.debug("unreadable EXIF, orientation taken as unset: %s", exc)
        return None
    for entry in entries:
        if entry.tag == tags.ORIENTATION:
            return entry_int(entry, layout.order)
    return None


def exif_dpi(exif: bytes | None) -> tuple[float, float] | None:
    """XResolution/YResolution/ResolutionUnit of an EXIF block's IFD0, as dots per inch."""
    if not exif:
        return None
    try:
        layout = read_header(exif)
        entries, _ = read_ifd(exif, layout.first_ifd, layout, follow=False)
    except (DirectoryError, struct.error):
        return None
    return tiff_dpi({e.tag: e for e in entries if e.data is not None}, layout.order)


def tiff_dpi(entries: dict[int, Entry], order: str) -> tuple[float, float] | None:
    """The resolution a directory's entries (by tag) declare, as dots per inch, or None."""
    unit = (
        entry_int(entries[tags.RESOLUTION_UNIT], order)
        if tags.RESOLUTION_UNIT in entries
        else _INCH  # the TIFF default
    )
    factor = {_INCH: 1.0, _CENTIMETRE: 2.54}.get(unit or 0)
    if factor is None or tags.X_RESOLUTION not in entries or tags.Y_RESOLUTION not in entries:
        return None
    values = []
    for tag in (tags.X_RESOLUTION, tags.Y_RESOLUTION):
        entry = entries[tag]
        if entry.kind != tags.RATIONAL or entry.count < 1:
            return None
        numerator, denominator = struct.unpack_from(order + "II", entry.data)
        if not (numerator and denominator):
            return None
        values.append(numerator / denominator * factor)
    return values[0], values[1]
