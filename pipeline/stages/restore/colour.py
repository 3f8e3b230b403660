"""Fading and colour cast: levels and white balance from robust percentiles of each channel,
applied only past a threshold, ramping in so the output never jumps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.stages.restore.shared import BAND_ROWS, allocate, sample_pixels

if TYPE_CHECKING:
    from pipeline.stages.restore import RestoreOptions

__all__ = ["correct_colour"]

# Correction ramps from nothing at the threshold to fully applied this much above it, so an
# image just over the threshold is barely touched and the output never jumps.
_RAMP = 0.10
# Levels put the measured black and white points here, a little inside 0..1, so the few
# pixels beyond the percentiles are compressed rather than clipped.
_TARGET_BLACK, _TARGET_WHITE = 0.02, 0.98


def _smoothstep(start: float, value: float) -> float:
    """0 up to `start`, 1 from start + _RAMP, smooth (zero slope at both ends) in between."""
    t = min(max((value - start) / _RAMP, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def correct_colour(
    pixels: np.ndarray,
    alpha: np.ndarray | None,
    opts: RestoreOptions,
    out: np.ndarray | None,
    scratch_dir: Path | None,
) -> tuple[np.ndarray, dict, bool]:
    """Per-channel affine levels. White balance draws each channel's black and white points
    towards the darkest black and brightest white of any channel (so no channel is dimmed);
    levels then stretch that common range. Each acts only as far as its ramp allows."""
    sample = sample_pixels(pixels, alpha)
    black, white = np.percentile(sample, [opts.low_percentile, opts.high_percentile], axis=0)
    black, white = black.astype(np.float64), white.astype(np.float64)
    low, high = float(black.min()), float(white.max())
    span = high - low
    # The cast is relative to the span, so fading does not hide it.
    cast = float(max((black - low).max(), (high - white).max())) / max(span, 1e-6)
    fade = 1.0 - span
    balance = _smoothstep(opts.cast_threshold, cast)
    levels = _smoothstep(opts.fade_threshold, fade)
    params: dict[str, Any] = {
        "cast": round(cast, 6),
        "fade": round(fade, 6),
        "cast_threshold": opts.cast_threshold,
        "fade_threshold": opts.fade_threshold,
        "percentiles": [opts.low_percentile, opts.high_percentile],
        "black": _rounded(black),
        "white": _rounded(white),
        "white_balance": round(balance, 6),
        "levels": round(levels, 6),
    }
    if (balance == 0.0 and levels == 0.0) or span < 1e-3:
        return pixels, params, False
    new_black = black + balance * (low - black)
    new_white = white + balance * (high - white)
    stretch = (_TARGET_WHITE - _TARGET_BLACK) / span
    new_black += levels * (_TARGET_BLACK + (new_black - low) * stretch - new_black)
    new_white += levels * (_TARGET_BLACK + (new_white - low) * stretch - new_white)
    gain = (new_white - new_black) / np.maximum(white - black, 1e-6)
    offset = new_black - black * gain
    params.update(gain=_rounded(gain), offset=_rounded(offset))
    out = allocate(pixels.shape, scratch_dir) if out is None else out
    gain32, offset32 = gain.astype(np.float32), offset.astype(np.float32)
    for top in range(0, pixels.shape[0], BAND_ROWS):
        rows = slice(top, top + BAND_ROWS)
        np.multiply(pixels[rows], gain32, out=out[rows])
        out[rows] += offset32
        np.clip(out[rows], 0.0, 1.0, out=out[rows])
    return out, params, True


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]
