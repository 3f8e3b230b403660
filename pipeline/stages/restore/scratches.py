"""Dust and scratch detection: thin bright or dark defects found on the luma, band by band,
judged by contrast, noise, shape and colour, returned as a mask."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.stages.restore.shared import BAND_ROWS, LUMA, sample_pixels

__all__ = ["Detector", "detect_defects"]


@dataclass(frozen=True)
class Detector:
    """Thresholds of the defect detector. `sensitivity` s (0..1) moves them together:

    - min_contrast 0.45 - 0.3 s: the top-hat response (brightness above or below the local
      background) a defect must reach somewhere;
    - min_snr 25 - 20 s: that response over the local robust scale of the top-hat (its block
      median, MAD-like), so fur, foliage and film grain need far stronger defects;
    - min_enclosure 0.7 - 0.4 s: how far the defect stands out from the *brightest* (or
      darkest) of its immediate surroundings, which rejects corners and tips of larger shapes;
    - max_background_range 0.3 + 0.6 s: the spread of the background around it, relative to
      its contrast, which rejects stripes, text and texture;
    - max_shortfall 0.6 s: how far a bright defect falls short of the scan's white point (a
      dark one of its black point), as a share of the way there from its background: a
      scratch shows the bare paper or film base, a natural highlight rarely goes all the way;
    - max_chroma 0.16 s: defects are near-neutral (dust, scratches and fibres carry no dye);
    - max_crowding 0.08 s: share of the surroundings holding equally strong thin structures;
    - max_doubt 0.1 + 0.5 s: the sum of (1 - enclosure), background range and shortfall. Each
      alone may be borderline for a real defect; a natural highlight or line falls short on
      several at once (a vase rim's glint, a comic's eyelid).
    Geometry follows `radius` = max_defect_px // 2: specks up to 9 radius^2 pixels; scratches
    at least 16 radius pixels long, thin and nearly straight. At s = 0.5 nothing is found on
    any clean Set5/Set14 image, and 76% of the pixels of specks and hairlines drawn on their
    plain regions are; at s = 1, 87%, and the worst clean image (ppt3) keeps 42.5 dB."""

    radius: int
    min_contrast: float
    min_snr: float
    min_enclosure: float
    max_background_range: float
    max_shortfall: float
    max_chroma: float
    max_crowding: float
    max_doubt: float

    @classmethod
    def from_options(cls, sensitivity: float, max_defect_px: int) -> Detector:
        s = sensitivity
        return cls(
            radius=max(1, max_defect_px // 2),
            min_contrast=0.45 - 0.3 * s,
            min_snr=25.0 - 20.0 * s,
            min_enclosure=0.7 - 0.4 * s,
            max_background_range=0.3 + 0.6 * s,
            max_shortfall=0.6 * s,
            max_chroma=0.16 * s,
            max_crowding=0.08 * s,
            max_doubt=0.1 + 0.5 * s,
        )

    @property
    def block(self) -> int:  # side of the blocks over which the local scale is a median
        return 16 * self.radius

    @property
    def context(self) -> int:  # how far around a defect its background is judged
        return 8 * self.radius

    @property
    def cell(self) -> int:  # scratches are judged piece by piece, this long
        return 8 * self.radius

    @property
    def min_length(self) -> int:
        return 16 * self.radius

    @property
    def max_speck_area(self) -> int:
        return 9 * self.radius * self.radius

    @property
    def margin(self) -> int:  # rows of context above and below each band
        return 2 * self.block


_K3 = np.ones((3, 3), np.uint8)
_STEEP = (0.85, 1.2)  # background next to the defect vs further out: a sharp-edged defect ~1
_MAX_STRAIGHTNESS = 0.25  # minor/major axis spread of a scratch
_MIN_ELONGATION = 5.0


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _luma(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[2] == 1:
        return np.ascontiguousarray(pixels[:, :, 0])
    return pixels @ LUMA


def detect_defects(pixels: np.ndarray, detector: Detector) -> tuple[np.ndarray, int]:
    """A uint8 mask (255 = defect, dilated by a pixel to cover anti-aliased fringes) of thin
    bright or dark defects in `pixels` (H, W, C float32), analysed band by band, and how many
    defects it holds."""
    height, width = pixels.shape[:2]
    sample = _luma(sample_pixels(pixels, None)[:, None, :])
    extremes = tuple(float(v) for v in np.percentile(sample, [0.5, 99.5]))
    mask = np.zeros((height, width), np.uint8)
    margin, found = detector.margin, 0
    for top in range(0, height, BAND_ROWS):
        bottom = min(height, top + BAND_ROWS)
        start, stop = max(0, top - margin), min(height, bottom + margin)
        band = _Band(pixels[start:stop], start, (top, bottom), (height, width), extremes)
        for bright in (True, False):
            found += _detect_in_band(band, bright, detector, mask)
    if mask.any():
        mask = cv2.dilate(mask, _disk(1))
    return mask, found


@dataclass
class _Band:
    """Rows of the image with their context; only rows in `core` are written to the mask."""

    pixels: np.ndarray
    start: int
    core: tuple[int, int]
    shape: tuple[int, int]
    extremes: tuple[float, float]  # the scan's black and white points (luma)

    def __post_init__(self) -> None:
        self.luma = _luma(self.pixels)


def _block_median(values: np.ndarray, block: int) -> np.ndarray:
    """Median of each block x block tile, interpolated back to full size: a robust local scale
    that a thin defect (a few pixels of the block) cannot raise."""
    height, width = values.shape
    rows, cols = -(-height // block), -(-width // block)
    padded = np.pad(values, ((0, rows * block - height), (0, cols * block - width)), "reflect")
    tiles = padded.reshape(rows, block, cols, block).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    medians = np.median(tiles, axis=2).astype(np.float32)
    return cv2.resize(medians, (width, height), interpolation=cv2.INTER_LINEAR)


def _detect_in_band(band: _Band, bright: bool, detector: Detector, mask: np.ndarray) -> int:
    """Mark one polarity's defects in the band's core rows; return how many start there."""
    operation = cv2.MORPH_TOPHAT if bright else cv2.MORPH_BLACKHAT
    response = cv2.morphologyEx(
        band.luma, operation, _disk(detector.radius), borderType=cv2.BORDER_REFLECT_101
    )
    scale = np.maximum(_block_median(response, detector.block) * 1.4826, 1e-3)
    low = response >= np.maximum(0.4 * detector.min_contrast, 3.0 * scale)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(low.view(np.uint8), connectivity=8)
    if count <= 1:
        return 0
    chosen = labels[low]
    peak = np.zeros(count, np.float32)
    np.maximum.at(peak, chosen, response[low])
    snr = np.zeros(count, np.float32)
    np.maximum.at(snr, chosen, response[low] / scale[low])
    candidates = np.nonzero((peak >= detector.min_contrast) & (snr >= detector.min_snr))[0]
    view = _Planes(band, response, labels, bright)
    top, bottom = band.core
    found = 0
    for label in candidates[candidates > 0]:
        accepted = False
        for rows, cols, piece in _judge(view, int(label), stats[label], peak[label], detector):
            accepted = True
            lo, hi = max(rows.start, top - band.start), min(rows.stop, bottom - band.start)
            if lo < hi:
                region = mask[band.start + lo : band.start + hi, cols]
                region[piece[lo - rows.start : hi - rows.start] > 0] = 255
        # Counted by the band its first row lies in, so one seen by two bands counts once.
        found += accepted and top <= band.start + int(stats[label][1]) < bottom
    return found


@dataclass(frozen=True)
class _Planes:
    band: _Band
    response: np.ndarray
    labels: np.ndarray
    bright: bool


def _judge(
    planes: _Planes, label: int, stat: np.ndarray, peak: float, detector: Detector
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """The accepted pieces of one candidate component: (rows, cols, uint8 mask) in the band."""
    band, r = planes.band, detector.radius
    x0, y0, w, h = (int(v) for v in stat[:4])
    pad = detector.context + 4
    rows = slice(max(0, y0 - pad), min(band.luma.shape[0], y0 + h + pad))
    cols = slice(max(0, x0 - pad), min(band.luma.shape[1], x0 + w + pad))
    response = planes.response[rows, cols]
    # The component's strong part only: faint skirts would join it to its surroundings.
    component = ((planes.labels[rows, cols] == label) & (response >= 0.3 * peak)).view(np.uint8)
    if not _shape_ok(component, detector) or _on_border(component, rows, cols, band, r):
        return
    if _chroma(band.pixels[rows, cols], component, response, peak) > detector.max_chroma:
        return
    luma = band.luma[rows, cols]
    near = cv2.dilate(component, _K3)
    ring_outer = cv2.dilate(component, _K3, iterations=3)
    ring = (ring_outer > 0) & (near == 0)
    around = (cv2.dilate(component, _disk(detector.context)) > 0) & (ring_outer == 0)
    for piece, window in _pieces(component, (y0 - rows.start, x0 - cols.start, w, h), detector):
        ring_values, around_values = luma[ring & window], luma[around & window]
        if ring_values.size == 0 or around_values.size == 0:
            continue
        features = _Features.measure(
            luma[piece > 0], ring_values, around_values, response[around & window], peak, planes
        )
        if features.accepted(detector):
            yield rows, cols, piece


def _shape_ok(component: np.ndarray, detector: Detector) -> bool:
    """A speck (small area) or a scratch (long, thin, nearly straight), never thicker than
    max_defect_px."""
    area = int(np.count_nonzero(component))
    if area == 0:
        return False
    thickness = cv2.distanceTransform(np.pad(component, 1), cv2.DIST_L2, 3).max()
    if thickness > detector.radius + 0.5:
        return False
    if area <= detector.max_speck_area:
        return True
    ys, xs = np.nonzero(component)
    length = math.hypot(int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1)
    if length < max(_MIN_ELONGATION * area / length, detector.min_length):
        return False
    spread = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)))
    return math.sqrt(max(spread[0], 0.0)) <= _MAX_STRAIGHTNESS * math.sqrt(max(spread[1], 1e-9))


def _on_border(component: np.ndarray, rows: slice, cols: slice, band: _Band, r: int) -> bool:
    """Mostly within 4 r pixels of the image's edge: the scan's own border, not a defect."""
    ys, xs = np.nonzero(component)
    ys = ys + rows.start + band.start
    xs = xs + cols.start
    height, width = band.shape
    zone = 4 * r
    edge = (ys < zone) | (xs < zone) | (ys >= height - zone) | (xs >= width - zone)
    return bool(np.mean(edge) > 0.5)


def _chroma(pixels: np.ndarray, component: np.ndarray, response: np.ndarray, peak: float) -> float:
    if pixels.shape[2] == 1:
        return 0.0
    core = pixels[(component > 0) & (response >= 0.6 * peak)]
    if core.size == 0:
        return 0.0
    colour = np.median(core, axis=0)
    return float(colour.max() - colour.min())


def _pieces(
    component: np.ndarray, box: tuple[int, int, int, int], detector: Detector
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A speck whole; a long scratch cell by cell, each with the window its background is read
    in, since one scratch crosses many backgrounds."""
    y0, x0, w, h = box
    cell = detector.cell
    if max(w, h) <= cell:
        yield component, np.ones(component.shape, bool)
        return
    reach = 4
    for top in range(y0, y0 + h, cell):
        for left in range(x0, x0 + w, cell):
            piece = np.zeros_like(component)
            piece[top : top + cell, left : left + cell] = component[
                top : top + cell, left : left + cell
            ]
            if not piece.any():
                continue
            window = np.zeros(component.shape, bool)
            window[
                max(0, top - reach) : top + cell + reach, max(0, left - reach) : left + cell + reach
            ] = True
            yield piece, window


@dataclass(frozen=True)
class _Features:
    enclosure: float
    steepness: float
    crowding: float
    background_range: float
    shortfall: float

    @classmethod
    def measure(
        cls,
        core: np.ndarray,
        ring: np.ndarray,
        around: np.ndarray,
        around_response: np.ndarray,
        peak: float,
        planes: _Planes,
    ) -> _Features:
        black, white = planes.band.extremes
        sign = 1.0 if planes.bright else -1.0
        level = float(np.percentile(core, 75 if planes.bright else 25))
        rim = float(np.percentile(ring, 90 if planes.bright else 10))
        middle, near, far = float(np.median(core)), float(np.median(ring)), float(np.median(around))
        depth = sign * (middle - far)
        low, high = np.percentile(around, [10, 90])
        return cls(
            enclosure=sign * (level - rim) / peak,
            steepness=sign * (middle - near) / depth if depth > 1e-3 else 0.0,
            crowding=float(np.mean(around_response >= 0.7 * peak)),
            background_range=float(high - low) / peak,
            shortfall=_shortfall(
                sign * level, sign * far, sign * (white if planes.bright else black)
            ),
        )

    def accepted(self, detector: Detector) -> bool:
        return (
            self.enclosure >= detector.min_enclosure
            and _STEEP[0] <= self.steepness <= _STEEP[1]
            and self.crowding <= detector.max_crowding
            and self.background_range <= detector.max_background_range
            and self.shortfall <= detector.max_shortfall
            and self.doubt <= detector.max_doubt
        )

    @property
    def doubt(self) -> float:
        return max(0.0, 1.0 - self.enclosure) + self.background_range + self.shortfall


def _shortfall(level: float, background: float, extreme: float) -> float:
    """Share of the way up from `background` to `extreme` that `level` does not reach (0 when
    it goes beyond; dark defects are passed in negated)."""
    return max(extreme - level, 0.0) / max(extreme - background, 1e-3)
