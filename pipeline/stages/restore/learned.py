"""Learned dust and scratch detection: the DefectUNet run tiled over the scan (its luma, or its
RGB for a colour network) through the shared engine, its probabilities thresholded band by band
into the mask of pixels to repair."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from pipeline import buffers
from pipeline.stages.restore.shared import BAND_ROWS, MAX_BYTES_IN_RAM
from pipeline.tiling import Engine, TileSettings, luma, run_tiled

__all__ = ["HALO", "LEARNED_OVERLAP", "detect_learned", "mask_from_probability"]

# The U-Net sees 8 px at its coarsest level through 3x3 convolutions: 32 px of overlap keep
# tiled probabilities within float rounding of whole-image ones.
LEARNED_OVERLAP = 32
# The luma and the probabilities are one float per pixel each: past this they live on disk,
# read and released band by band (a 50 MP scan's would be 200 MB each).
_PLANE_BYTES_IN_RAM = 32 << 20
# Hysteresis: a detection (probability >= threshold) extends over up to _REACH pixels of
# connected, less certain probability (>= _SUPPORT x threshold), the faint ends and edges of a
# defect the network is sure of; then the mask is grown by _GROW pixels to cover the soft,
# anti-aliased skirt that grain hides from the network (since recipe v4 the network is trained
# on the defects' clearly visible cores only, training/train_defects.py). On the harness's
# damage, perfect cores grown by 1 px cover 91 % of the pixels a defect moved by 2/255 or more
# and by 2 px 98 %, but OpenCV's inpainting of the wider band gains less (+9.75 against
# +7.44 dB), and with the v4 candidate 2 px found 0.42 of the damage against 0.40 while losing
# 4.25 dB outside it against 3.80: 1 px stays.
_SUPPORT = 0.5
_REACH = 2
_GROW = 1
HALO = _REACH + _GROW  # rows of context a band of the mask needs on each side


def mask_from_probability(probability: np.ndarray, threshold: float) -> np.ndarray:
    """The uint8 mask (255 = repair) of a (H, W) probability plane; exact wherever the plane
    extends HALO pixels beyond the rows and columns kept."""
    seed = (probability >= threshold).astype(np.uint8)
    if not seed.any():
        return seed
    support = (probability >= threshold * _SUPPORT).astype(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    for _ in range(_REACH):
        seed = cv2.dilate(seed, cross) & support
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * _GROW + 1,) * 2)
    return cv2.dilate(seed, grow) * np.uint8(255)


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
    if engine.in_channels == 3:  # a colour network; a grey scan goes in as grey RGB
        source = pixels
        if pixels.shape[2] == 1:
            source = buffers.copy(
                pixels,
                channels=3,
                max_bytes_in_ram=settings.max_bytes_in_ram,
                scratch_dir=settings.scratch_dir,
                band_rows=BAND_ROWS,
            )
    else:
        source = pixels if pixels.shape[2] == 1 else luma(pixels, settings)
    tiled = run_tiled(engine, np.asarray(source), settings, progress=progress)
    probability = tiled.pixels
    height, width = pixels.shape[:2]
    mask = buffers.allocate(
        (height, width), np.uint8, max_bytes_in_ram=MAX_BYTES_IN_RAM, scratch_dir=scratch_dir
    )
    for top in range(0, height, BAND_ROWS):
        bottom = min(height, top + BAND_ROWS)
        start, stop = max(0, top - HALO), min(height, bottom + HALO)
        band = mask_from_probability(np.asarray(probability[start:stop, :, 0]), threshold)
        mask[top:bottom] = band[top - start : top - start + bottom - top]
        buffers.release_rows(probability, start, stop)
        buffers.release_rows(mask, top, bottom)
    del probability
    if source is not pixels:
        del source
    return mask, {"tile": tiled.tile, "overlap": LEARNED_OVERLAP, "tiles": tiled.tiles}
