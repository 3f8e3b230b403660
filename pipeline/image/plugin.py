"""The contract of a format module: the Format entry it registers (signature, decoder, writer,
limits) and what its decoder hands back, with the helpers every decoder shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DecodeError, ImageTooLargeError
from pipeline.image.values import Image, Metadata

__all__ = ["Decoded", "Format", "check_pixel_count", "library_errors", "read_file"]


@dataclass(frozen=True)
class Decoded:
    """What a format decoder hands back: stored (not yet upright) integer samples and metadata."""

    samples: np.ndarray  # (H, W) or (H, W, C) uint8/uint16; alpha is the last channel if present
    has_alpha: bool
    bit_depth: int
    metadata: Metadata
    premultiplied: bool = False


@dataclass(frozen=True)
class Format:
    """One image format as a format module registers it."""

    name: str  # the key in the registry and Image.format
    suffix: str  # the suffix we write
    aliases: tuple[str, ...]  # other names and suffixes (without the dot) that mean this format
    matches: Callable[[bytes], bool]  # whether a file's first 32 bytes are this format's
    decode: Callable[[Path, int], Decoded]  # (path, max_pixels); raises only ImageError
    write: Callable[[Image, Path, int, int, Metadata], None]  # (image, path, depth, quality, meta)
    max_side: int | None = None  # the widest or tallest image the format holds, if limited
    eight_bit_only: bool = False  # True where 16-bit samples cannot be stored


def read_file(path: Path, size: int = -1) -> bytes:
    """The first `size` bytes of `path` (all by default); an unreadable file is a DecodeError."""
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise DecodeError(path, f"cannot read file: {exc.strerror or exc}") from exc


@contextmanager
def library_errors(path: Path, what: str) -> Iterator[None]:
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


def check_pixel_count(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Refuse a header declaring more than `max_pixels`, before any pixel is decoded."""
    if width * height > max_pixels:
        raise ImageTooLargeError(
            path,
            f"declares {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,}",
        )
