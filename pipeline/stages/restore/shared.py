"""What the restore stage's parts share: the luma weights the detector and inpainting use,
the band height that keeps memory bounded, and scan-sized buffers (disk-backed when large)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline import buffers

__all__ = ["BAND_ROWS", "LUMA", "allocate", "copy_pixels", "sample_pixels"]

# ITU-R BT.601, as pipeline.tiling.luma: the detector works on the brightness of the scan.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
BAND_ROWS = 512  # rows analysed at once, so memory follows the band, not the scan
_SAMPLE_PIXELS = 1 << 20  # percentiles are measured on a strided sample of about this many
MAX_BYTES_IN_RAM = 256 << 20  # larger outputs go to a disk-backed buffer, as tiled ones do


def allocate(shape: tuple[int, ...], scratch_dir: Path | None) -> np.ndarray:
    return buffers.allocate(
        shape, np.float32, max_bytes_in_ram=MAX_BYTES_IN_RAM, scratch_dir=scratch_dir
    )


def copy_pixels(pixels: np.ndarray, scratch_dir: Path | None) -> np.ndarray:
    return buffers.copy(
        pixels, max_bytes_in_ram=MAX_BYTES_IN_RAM, scratch_dir=scratch_dir, band_rows=BAND_ROWS
    )


def sample_pixels(pixels: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """About _SAMPLE_PIXELS pixels (N, C) on a regular grid; only opaque ones when there is
    alpha, since the colour under transparent pixels is nobody's picture."""
    height, width = pixels.shape[:2]
    step = max(1, math.isqrt(height * width // _SAMPLE_PIXELS))
    sample = pixels[::step, ::step].reshape(-1, pixels.shape[2])
    if alpha is not None:
        opaque = alpha[::step, ::step].reshape(-1) > 0.5
        if np.count_nonzero(opaque) >= 64:
            sample = sample[opaque]
    return sample
