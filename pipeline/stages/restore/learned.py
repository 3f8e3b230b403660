"""Learned dust and scratch detection: the DefectUNet run tiled over the scan's luma through the
shared engine, its probabilities thresholded band by band into the mask of pixels to repair."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from pipeline import buffers
from pipeline.stages.restore.shared import BAND_ROWS, MAX_BYTES_IN_RAM
from pipeline.tiling import Engine, TileSettings, luma, run_tiled

__all__ = ["LEARNED_OVERLAP", "detect_learned"]

# The U-Net sees 8 px at its coarsest level through 3x3 convolutions: 32 px of overlap keep
# tiled probabilities within float rounding of whole-image ones.
LEARNED_OVERLAP = 32
# The luma and the probabilities are one float per pixel each: past this they live on disk,
# read and released band by band (a 50 MP scan's would be 200 MB each).
_PLANE_BYTES_IN_RAM = 32 << 20
# The mask is grown by this many pixels to cover the anti-aliased fringe of each defect.
_GROW = 1


def detect_learned(
    pixels: np.ndarray,
    engine: Engine,
    threshold: float,
    tile: int,
    scratch_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict]:
    """A uint8 mask (255 = defect) of `pixels` (H, W, C float32) and what shaped it."""
    settings = TileSettings(
        tile=tile,
        overlap=LEARNED_OVERLAP,
        max_bytes_in_ram=_PLANE_BYTES_IN_RAM,
        scratch_dir=scratch_dir,
    )
    brightness = pixels if pixels.shape[2] == 1 else luma(pixels, settings)
    tiled = run_tiled(engine, np.asarray(brightness), settings, progress=progress)
    probability = tiled.pixels
    height, width = pixels.shape[:2]
    mask = buffers.allocate(
        (height, width), np.uint8, max_bytes_in_ram=MAX_BYTES_IN_RAM, scratch_dir=scratch_dir
    )
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * _GROW + 1,) * 2)
    for top in range(0, height, BAND_ROWS):
        bottom = min(height, top + BAND_ROWS)
        start, stop = max(0, top - _GROW), min(height, bottom + _GROW)
        band = (probability[start:stop, :, 0] >= threshold).astype(np.uint8) * 255
        if band.any():
            band = cv2.dilate(band, kernel)
        mask[top:bottom] = band[top - start : top - start + bottom - top]
        buffers.release_rows(probability, start, stop)
        buffers.release_rows(mask, top, bottom)
    del probability
    if brightness is not pixels:
        del brightness
    return mask, {"tile": tiled.tile, "overlap": LEARNED_OVERLAP, "tiles": tiled.tiles}
