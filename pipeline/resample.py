"""Resize images band by band, so a disk-backed output of hundreds of megapixels is resampled
without ever being read whole; each band's rows equal those of one whole-image cv2.resize."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from pipeline import buffers

__all__ = ["resize"]

_BAND_ROWS = 256  # output rows per band, rounded up to the resampling period
_SUPPORT = 8  # source rows of context each side: covers Lanczos-4 and linear kernels


def resize(
    source: np.ndarray,
    size: tuple[int, int],
    interpolation: int,
    *,
    max_bytes_in_ram: int,
    scratch_dir: Path | str | None,
) -> np.ndarray:
    """`cv2.resize(source, size, interpolation)` clipped to [0, 1], computed in row bands.

    `source` is (H, W) or (H, W, C) float32; `size` is (width, height) as for OpenCV. Bands
    start on rows where the source/output ratio lands on whole source rows, and carry enough
    source rows of context that OpenCV's kernel never reaches a band edge, so every output row
    is the one a whole-image resize gives. Where the ratio has no such rows within reach (a
    coprime height pair), the image is resized in one piece.
    """
    width, height = size
    src_h = source.shape[0]
    shape = (height, width, *source.shape[2:])
    out = buffers.allocate(
        shape, np.float32, max_bytes_in_ram=max_bytes_in_ram, scratch_dir=scratch_dir
    )
    period = math.gcd(src_h, height)
    src_step, dst_step = src_h // period, height // period
    # A period of whole source rows at least the kernel's reach keeps the context exact.
    margin_periods = math.ceil(_SUPPORT / src_step) if src_step else 0
    band = dst_step * max(1, math.ceil(_BAND_ROWS / dst_step))
    if band >= height or dst_step * margin_periods > height:
        whole = cv2.resize(np.ascontiguousarray(source), size, interpolation=interpolation)
        np.clip(whole.reshape(out.shape), 0.0, 1.0, out=out)
        return out
    margin_src = margin_periods * src_step
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        s0, s1 = y0 // dst_step * src_step, math.ceil(y1 / dst_step) * src_step
        lo, hi = max(0, s0 - margin_src), min(src_h, s1 + margin_src)
        _resize_band(
            source, out, (y0, y1), (lo, hi), (s0 - lo) // src_step * dst_step, size, interpolation
        )
        buffers.release_rows(source, lo, hi)
    return out


def _resize_band(
    source: np.ndarray,
    out: np.ndarray,
    rows: tuple[int, int],
    source_rows: tuple[int, int],
    skip: int,
    size: tuple[int, int],
    interpolation: int,
) -> None:
    """Resize source rows [lo, hi) and keep the output rows [y0, y1) they contain."""
    (y0, y1), (lo, hi) = rows, source_rows
    dst_h = round((hi - lo) * size[1] / source.shape[0])
    piece = cv2.resize(
        np.ascontiguousarray(source[lo:hi]), (size[0], dst_h), interpolation=interpolation
    )
    piece = piece.reshape(dst_h, size[0], *out.shape[2:])
    np.clip(piece[skip : skip + (y1 - y0)], 0.0, 1.0, out=out[y0:y1])
    buffers.release_rows(out, y0, y1)
