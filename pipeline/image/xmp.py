"""The numeric fields of an XMP packet we read and rewrite (orientation, pixel sizes), found by
pattern in both the attribute and the element form, leaving every other byte as it was."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["ORIENTATION", "read_int", "replace_ints"]

ORIENTATION = b"tiff:Orientation"
IMAGE_WIDTH = b"tiff:ImageWidth"
IMAGE_LENGTH = b"tiff:ImageLength"
PIXEL_X_DIMENSION = b"exif:PixelXDimension"
PIXEL_Y_DIMENSION = b"exif:PixelYDimension"


def _patterns(name: bytes) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    return (
        re.compile(rb"(" + name + rb"\s*=\s*[\"'])\s*(\d+)\s*([\"'])"),
        re.compile(rb"(<" + name + rb">)\s*(\d+)\s*(</" + name + rb">)"),
    )


_FIELDS = {
    name: _patterns(name)
    for name in (ORIENTATION, IMAGE_WIDTH, IMAGE_LENGTH, PIXEL_X_DIMENSION, PIXEL_Y_DIMENSION)
}


def read_int(xmp: bytes | None, name: bytes) -> int | None:
    """The value of field `name` (one of this module's names), or None."""
    if not xmp:
        return None
    for pattern in _FIELDS[name]:
        match = pattern.search(xmp)
        if match:
            return int(match.group(2))
    return None


def replace_ints(xmp: bytes, values: Mapping[bytes, int]) -> bytes:
    """`xmp` with every occurrence of each named field set to its value."""
    for name, value in values.items():
        replacement = rb"\g<1>" + str(value).encode() + rb"\g<3>"
        for pattern in _FIELDS[name]:
            xmp = pattern.sub(replacement, xmp)
    return xmp
