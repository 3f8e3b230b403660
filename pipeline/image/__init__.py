"""Decode and encode images with their metadata (ICC, EXIF, XMP, IPTC), keeping bit depth and alpha.

Decoding is strict: a file is decoded exactly, refused with UnsupportedImageError saying what it
is, or rejected with DecodeError saying what is damaged; a silently wrong image is never returned.
Encoding carries the metadata across (EXIF patched in place, so maker notes stay valid) and writes
PNG and TIFF band by band, so disk-backed images of any size never need a full-size copy in RAM.

The package is laid out as Pillow's is: `tags` (tag numbers by name), `directory` (the TIFF/EXIF
IFD reader and writer), `declarations` and `xmp` (what metadata states), `metadata` (what an
output carries), `banding`, `plugin` (a format's contract), `formats` (one module per format and
the registry) and `codec` (decode and encode).
"""

from __future__ import annotations

from pipeline.image.codec import (
    DEFAULT_MAX_PIXELS,
    decode,
    encode,
    format_from_name,
    suffix_for,
)
from pipeline.image.formats import FORMATS
from pipeline.image.values import Image, Metadata

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
