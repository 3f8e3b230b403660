"""Fading and colour cast: levels and white balance from robust percentiles of each channel,
applied only where the picture itself gives evidence of a cast or a fade, and bounded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pipeline.stages.restore.shared import BAND_ROWS, LUMA, allocate, sample_pixels

if TYPE_CHECKING:
    from pipeline.stages.restore import RestoreOptions

__all__ = ["ColourEvidence", "correct_colour", "measure_evidence"]

# Correction ramps from nothing at the threshold to fully applied this much above it, so an
# image just over the threshold is barely touched and the output never jumps.
_RAMP = 0.10
# Levels put the measured black and white points here, a little inside 0..1, so the few
# pixels beyond the percentiles are compressed rather than clipped.
_TARGET_BLACK, _TARGET_WHITE = 0.02, 0.98
# Evidence is read on the picture reduced to about this many pixels on its long side: area
# averaging removes grain and sensor noise, which would otherwise read as colour.
_EVIDENCE_SIDE = 256
# Pixels this dark or bright carry no reliable colour (noise, clipping).
_MID = (0.08, 0.92)
# A pixel is near-neutral when its chroma is below this share of its brightness.
_NEUTRAL = 0.06
# Toned or monochrome: at any one brightness every pixel has nearly the same colour (the
# toner's curve). Measured as the spread of chroma within brightness bins, relative to luma.
_MONOCHROME_SPREAD = 0.035
# Above this spread the picture is strongly coloured throughout (flowers, fabrics, stained
# slides): its unequal channel ranges are its subject, and white balance is not attempted.
_SATURATED_SPREAD = 0.45
# A cast is a cast when the darks, mid-tones and lights all lean the way the black and white
# points say (a saturated object leans only its own tones), and balancing leaves at least as
# much of the picture neutral as before (a balanced picture's greys turn coloured).
# Measured (bench/colour.py, wide and held-out sets): no clean picture refused by agreement
# alone scores above 0.30 (Lenna high-key), while dye-faded copies score from -0.45 up; 0.4
# keeps a 0.1 margin above the clean ones and corrects the faded ones between 0.4 and 0.5.
_MIN_AGREEMENT = 0.4
# White balance reads the white point: a picture whose brightest channel stays below this has
# no white (a night or low-key scene), and the unequal channels are its colours, not a cast.
_MIN_WHITE = 0.5
# Fading lifts the black point and dims the paper. A picture whose darkest tones reach below
# _MIN_FADED_BLACK is low-key or simply dark; one with no darks at all (black point above
# _MAX_FADED_BLACK) is a sky or a wall; one whose white reaches _MAX_FADED_WHITE kept its paper
# white, so its lifted blacks are its key (high-key, mist), not fading; one with no white at
# all is a dark scene. Most tones near the white is high-key too.
# "Darks" are dark in brightness: the lowest channel alone is no dark tone, since in a
# saturated colour (a blue sky) one channel sits low however bright the picture is. So the
# brightness's own black point must lie below _MAX_FADED_BLACK as well.
# Levels need colour evidence too. Dye fading is a colour phenomenon: the dyes fade at
# different rates, so the picture loses contrast *and* its channels part. A monochrome
# picture (greyscale, neutral or toned) carries no such evidence: a soft print on matte paper,
# a low-contrast grade or a camera capture of a print has lifted blacks and a dim white just as
# a faded one has, and stretching it is a curator's contrast decision, not a repair.
_MIN_FADED_BLACK = 0.15
_MAX_FADED_BLACK = 0.45
_MIN_FADED_WHITE = 0.6
_MAX_FADED_WHITE = 0.92
_MAX_FADED_MEDIAN = 0.75
# Largest gain on any channel. A cast or fade that asks for more is what a dark scene, or
# one lit by a saturated object, looks like to percentiles: refused, since the "correction"
# would lift noise into the picture and grey the object. White balance alone may ask for
# less: a dye cast that needs more than doubling a channel is a coloured subject.
_MAX_GAIN = 3.5
_MAX_BALANCE_GAIN = 2.0
# Dye fading is a loss of dye density, and density is greatest in the shadows: the faded dye's
# complementary channel rises in the blacks too (a print whose cyan fades gets reddish, lifted
# blacks), so a fading cast always shows as black points that part. A cast only at the white
# end, over deep neutral blacks, is what coloured light looks like (a sunset, a dust haze, an
# orange townscape, tungsten light, a warm grade), and a yellowed varnish or a camera's white
# balance look the same: none of them tells its colour from the scene's, so white balance
# needs the blacks to part by at least this share of the tonal range. Levels need the same
# evidence (they act only with white balance, and no further than it): a neutral lift with a
# dim white is a soft print, mist, flare or a low-contrast grade as often as a fade.
# Chosen on bench/colour.py's wide and second sets: the clean scenes white balance changed
# part by 0.01-0.21 (a sunset 0.02, a dust haze 0.13, two real autochromes 0.01 and 0.16),
# the display-linear dye fades by 0.40-0.50; the density-model fades part by 0.18 and up
# (median 0.29), so the bar gives up the mildest of those: a fade is left, never harmed.
_MIN_SHADOW_CAST = 0.25


def _smoothstep(start: float, value: float) -> float:
    """0 up to `start`, 1 from start + _RAMP, smooth (zero slope at both ends) in between."""
    t = min(max((value - start) / _RAMP, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class ColourEvidence:
    """What the picture says about itself, measured on a reduced copy."""

    monochrome: bool  # one channel, or toned/neutral monochrome: never balanced or levelled
    spread: float  # chroma spread within brightness bins, relative to luma
    neutral_before: float  # share of mid-tone pixels that are near-neutral as they are
    neutral_after: float  # ... and after the proposed white balance
    agreement: float  # least share of the cast the darks, mids and lights each show
    balance_gain: float  # largest channel gain white balance alone would apply
    black: float  # darkest black point of any channel
    white: float  # brightest white point of any channel
    dark: float  # black point of the brightness (luma)
    median: float  # median brightness, as a share of the way from black to white
    shadow_cast: float  # how far the channels' black points part, as a share of the range

    def as_params(self) -> dict[str, Any]:
        return {
            "monochrome": self.monochrome,
            "spread": round(self.spread, 6),
            "neutral_before": round(self.neutral_before, 6),
            "neutral_after": round(self.neutral_after, 6),
            "agreement": round(self.agreement, 6),
            "balance_gain": round(self.balance_gain, 6),
            "median": round(self.median, 6),
            "dark": round(self.dark, 6),
            "shadow_cast": round(self.shadow_cast, 6),
        }

    def cast_doubts(self) -> list[str]:
        """Why the unequal channels are not a cast (empty: they are one)."""
        doubts = {
            "monochrome": self.monochrome,
            "neutral blacks: no dye-fade evidence": self.shadow_cast < _MIN_SHADOW_CAST,
            "strongly coloured": self.spread > _SATURATED_SPREAD,
            "no white": self.white < _MIN_WHITE,
            f"balance gain above {_MAX_BALANCE_GAIN}": self.balance_gain > _MAX_BALANCE_GAIN,
            "balancing leaves less neutral": self.neutral_after < self.neutral_before,
            "darks, mid-tones and lights disagree": self.agreement < _MIN_AGREEMENT,
        }
        return [doubt for doubt, holds in doubts.items() if holds]

    def fade_doubts(self) -> list[str]:
        """Why the short tonal range is not fading (empty: it is)."""
        doubts = {
            "monochrome: no dye-fade evidence": self.monochrome,
            "low-key": self.black < _MIN_FADED_BLACK,
            "no dark tones": max(self.black, self.dark) > _MAX_FADED_BLACK,
            "no white": self.white < _MIN_FADED_WHITE,
            "paper white kept": self.white > _MAX_FADED_WHITE,
            "high-key": self.median > _MAX_FADED_MEDIAN,
        }
        return [doubt for doubt, holds in doubts.items() if holds]


def reduce(pixels: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """The picture area-averaged to about _EVIDENCE_SIDE pixels on its long side, band by
    band (memory follows the band), as (N, C) pixels; with alpha, only cells mostly opaque,
    each averaged over its opaque pixels."""
    height, width = pixels.shape[:2]
    factor = max(1, -(-max(height, width) // _EVIDENCE_SIDE))
    if factor == 1:
        return sample_pixels(pixels, alpha)
    out_w, out_h = width // factor, height // factor
    if out_w == 0 or out_h == 0:
        return sample_pixels(pixels, alpha)
    band = max(factor, BAND_ROWS - BAND_ROWS % factor)
    cells, weights = [], []
    for top in range(0, out_h * factor, band):
        rows = slice(top, min(top + band, out_h * factor))
        chunk = np.asarray(pixels[rows, : out_w * factor], np.float32)
        size = (out_w, (rows.stop - rows.start) // factor)
        if alpha is None:
            cells.append(cv2.resize(chunk, size, interpolation=cv2.INTER_AREA))
            continue
        opaque = (np.asarray(alpha[rows, : out_w * factor]) > 0.5).astype(np.float32)
        weight = cv2.resize(opaque, size, interpolation=cv2.INTER_AREA)
        summed = cv2.resize(chunk * opaque[..., None], size, interpolation=cv2.INTER_AREA)
        cells.append(summed.reshape(*weight.shape, -1) / np.maximum(weight, 1e-6)[..., None])
        weights.append(weight.reshape(-1))
    reduced = np.concatenate([c.reshape(-1, pixels.shape[2]) for c in cells], axis=0)
    if alpha is not None:
        keep = np.concatenate(weights) > 0.5
        if np.count_nonzero(keep) >= 64:
            reduced = reduced[keep]
    return reduced


def _opponent(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Luma and (red-green, yellow-blue) chroma of (N, 3) pixels."""
    y = rgb @ LUMA
    chroma = np.stack([rgb[:, 0] - rgb[:, 1], 0.5 * (rgb[:, 0] + rgb[:, 1]) - rgb[:, 2]], axis=1)
    return y, chroma


def _neutral_share(rgb: np.ndarray) -> float:
    y, chroma = _opponent(rgb)
    mid = (y > _MID[0]) & (y < _MID[1])
    if np.count_nonzero(mid) < 16:
        return 0.0
    size = np.hypot(chroma[mid, 0], chroma[mid, 1]) / y[mid]
    return float(np.mean(size < _NEUTRAL))


def _spread(rgb: np.ndarray) -> float:
    """Chroma spread within 12 brightness bins, relative to luma, weighted by bin size."""
    y, chroma = _opponent(rgb)
    mid = (y > _MID[0]) & (y < _MID[1])
    if np.count_nonzero(mid) < 16:
        return 0.0
    y, chroma = y[mid], chroma[mid] / y[mid, None]
    bins = np.minimum(((y - _MID[0]) / (_MID[1] - _MID[0]) * 12).astype(int), 11)
    total, weight = 0.0, 0
    for b in range(12):
        inside = chroma[bins == b]
        if len(inside) >= 8:
            total += float(inside.var(axis=0).sum()) * len(inside)
            weight += len(inside)
    return float(np.sqrt(total / weight)) if weight else 0.0


def _agreement(rgb: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> float:
    """How much of the proposed correction's chroma change the darks, mid-tones and lights
    each ask for: the mean chroma of each third, projected on the change the correction
    makes to it, over the size of that change (1: all agree; <= 0: some third disagrees)."""
    y, chroma = _opponent(rgb)
    _, after = _opponent(rgb * gain + offset)
    order = np.argsort(y)
    least = np.inf
    for third in np.array_split(order, 3):
        if len(third) < 8:
            continue
        before_mean, change = chroma[third].mean(axis=0), (chroma[third] - after[third]).mean(0)
        size = float(np.hypot(*change))
        if size < 1e-4:
            continue
        least = min(least, float(before_mean @ change) / size**2)
    return 0.0 if not np.isfinite(least) else least


def measure_evidence(
    reduced: np.ndarray,
    black: np.ndarray,
    white: np.ndarray,
    dark: float,
    gain: np.ndarray,
    offset: np.ndarray,
) -> ColourEvidence:
    low, high = float(black.min()), float(white.max())
    y = reduced @ LUMA if reduced.shape[1] == 3 else reduced[:, 0]
    median = (float(np.median(y)) - low) / max(high - low, 1e-6)
    shadow_cast = (float(black.max()) - low) / max(high - low, 1e-6)
    if reduced.shape[1] == 1:
        return ColourEvidence(True, 0.0, 1.0, 1.0, 0.0, 1.0, low, high, dark, median, 0.0)
    spread = _spread(reduced)
    balanced = np.clip(reduced * gain + offset, 0.0, 1.0)
    return ColourEvidence(
        monochrome=spread < _MONOCHROME_SPREAD,
        spread=spread,
        neutral_before=_neutral_share(reduced),
        neutral_after=_neutral_share(balanced),
        agreement=_agreement(reduced, gain, offset),
        balance_gain=float(gain.max()),
        black=low,
        white=high,
        dark=dark,
        median=median,
        shadow_cast=shadow_cast,
    )


def _affine(
    black: np.ndarray, white: np.ndarray, balance: float, levels: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel gain and offset: white balance draws each channel's black and white points
    towards the darkest black and brightest white of any channel (so no channel is dimmed);
    levels then stretch that common range. Each acts only as far as its weight allows."""
    low, high = float(black.min()), float(white.max())
    span = high - low
    new_black = black + balance * (low - black)
    new_white = white + balance * (high - white)
    stretch = (_TARGET_WHITE - _TARGET_BLACK) / span
    new_black = new_black + levels * (_TARGET_BLACK + (new_black - low) * stretch - new_black)
    new_white = new_white + levels * (_TARGET_BLACK + (new_white - low) * stretch - new_white)
    gain = (new_white - new_black) / np.maximum(white - black, 1e-6)
    return gain, new_black - black * gain


def correct_colour(
    pixels: np.ndarray,
    alpha: np.ndarray | None,
    opts: RestoreOptions,
    out: np.ndarray | None,
    scratch_dir: Path | None,
) -> tuple[np.ndarray, dict, bool]:
    """Per-channel affine levels and white balance from robust percentiles, each applied only
    past its threshold and only when the picture's own evidence says it is a cast or a fade:
    toned and monochrome prints keep their tone, low-key and high-key scenes their key,
    saturated objects their colour."""
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
    }
    if (balance > 0.0 or levels > 0.0) and span >= 1e-3:
        reduced = reduce(pixels, alpha).astype(np.float64)
        brightness = sample @ LUMA if sample.shape[1] == 3 else sample[:, 0]
        dark = float(np.percentile(brightness, opts.low_percentile))
        evidence = measure_evidence(reduced, black, white, dark, *_affine(black, white, 1.0, 0.0))
        params["evidence"] = evidence.as_params()
        # What the percentile rule asked for and why the picture refused it, so a curator
        # sees every decision not taken.
        cast_doubts, fade_doubts = evidence.cast_doubts(), evidence.fade_doubts()
        if balance > 0.0 and cast_doubts:
            params["white_balance_refused"], balance = cast_doubts, 0.0
        if cast_doubts and not evidence.monochrome:
            # Levels need the dye-fade evidence white balance needs: channels that part for a
            # reason we cannot name leave the tonal range unexplained too (stretching their
            # common range would only exaggerate the parting), and a range that is short with
            # no parting at all is a soft print, mist or a grade as often as a fade.
            named = ", ".join(doubt.split(":")[0] for doubt in cast_doubts)
            fade_doubts = [*fade_doubts, f"no dye-fade evidence: {named}"]
        if levels > 0.0 and balance == 0.0 and not fade_doubts:
            # The channels part too little for white balance's threshold: levels alone would
            # stretch a dye cast along with the range, so a fade goes only with its cast.
            fade_doubts = ["no dye cast to balance with it"]
        if levels > 0.0 and fade_doubts:
            params["levels_refused"], levels = fade_doubts, 0.0
        # Never stretched further than its cast is balanced (both ramp together).
        levels = min(levels, balance)
    params.update(white_balance=round(balance, 6), levels=round(levels, 6))
    if (balance == 0.0 and levels == 0.0) or span < 1e-3:
        return pixels, params, False
    gain, offset = _affine(black, white, balance, levels)
    params.update(gain=_rounded(gain), offset=_rounded(offset))
    if float(gain.max()) > _MAX_GAIN:
        params.update(white_balance=0.0, levels=0.0, refused=f"gain above {_MAX_GAIN}")
        return pixels, params, False
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
