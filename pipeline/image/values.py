"""The values image I/O hands over: upright pixels (Image) and the metadata carried with them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["Image", "Metadata"]


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
