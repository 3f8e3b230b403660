"""Row banding for encoders: an image converted to integer samples a band of rows at a time, so
a disk-backed image of any size is written in bounded memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.buffers import release_rows
from pipeline.errors import EncodeError
from pipeline.image.values import Image

__all__ = ["BAND_ROWS", "bands", "whole"]

BAND_ROWS = 256  # rows converted per step when encoding; equals the TIFF tile height


def bands(image: Image, path: Path, depth: int, *, with_alpha: bool = True) -> Iterator[np.ndarray]:
    """Yield (rows, W, C) integer bands, alpha last; source pages are released as each is read.

    Only one band is ever converted at a time, so a disk-backed np.memmap of any size is written
    in bounded memory.
    """
    dtype, scale = (np.uint16, 65535.0) if depth == 16 else (np.uint8, 255.0)
    alpha = image.alpha if with_alpha else None
    channels = image.channels + (alpha is not None)
    for start in range(0, image.height, BAND_ROWS):
        stop = min(start + BAND_ROWS, image.height)
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


def whole(image: Image, path: Path, depth: int, *, with_alpha: bool) -> np.ndarray:
    """All rows at once, for encoders whose library takes the whole image (JPEG, WebP)."""
    return np.concatenate(list(bands(image, path, depth, with_alpha=with_alpha)), axis=0)
