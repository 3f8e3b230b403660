"""Restoration of scanned prints, each part switchable: compression artefacts (an optional
learned model), fading and colour cast (levels and white balance from robust percentiles), and
dust and scratches (detected, inpainted, and reported as a mask of invented pixels)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import spandrel
import torch
from pydantic import Field, model_validator

from pipeline import buffers
from pipeline.errors import StageError
from pipeline.image import Image
from pipeline.stage import StageContext, StageOptions, StageResult, check_tiling
from pipeline.stages.engines import EngineCache, registered_loader
from pipeline.tiling import Engine, TileSettings, auto_overlap, luma, run_tiled

__all__ = ["RestoreOptions", "RestoreStage"]

# ITU-R BT.601, as pipeline.tiling.luma: the detector works on the brightness of the scan.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_BAND_ROWS = 512  # rows analysed at once, so memory follows the band, not the scan
_SAMPLE_PIXELS = 1 << 20  # percentiles are measured on a strided sample of about this many
# Correction ramps from nothing at the threshold to fully applied this much above it, so an
# image just over the threshold is barely touched and the output never jumps.
_RAMP = 0.10
# Levels put the measured black and white points here, a little inside 0..1, so the few
# pixels beyond the percentiles are compressed rather than clipped.
_TARGET_BLACK, _TARGET_WHITE = 0.02, 0.98
_MAX_BYTES_IN_RAM = 256 << 20  # larger outputs go to a disk-backed buffer, as tiled ones do


class RestoreOptions(StageOptions):
    # Fading and colour cast: white balance and levels from the low/high percentiles of each
    # channel, applied only when the measured cast or fade passes its threshold (ramping to
    # full strength 0.1 above it), so a balanced image is left exactly as it is.
    colour: bool = True
    # Largest cast left alone: how far one channel's black or white point lies from the
    # darkest black / brightest white of any channel, as a share of that range.
    cast_threshold: float = Field(0.30, ge=0, le=1)
    # Largest fade left alone: the share of 0..1 the image's tonal range no longer spans.
    fade_threshold: float = Field(0.25, ge=0, le=1)
    low_percentile: float = Field(0.5, ge=0, lt=50)
    high_percentile: float = Field(99.5, gt=50, le=100)
    # Dust and scratches: thin bright or dark defects, found on the luma and inpainted.
    dust: bool = True
    # 0..1: higher also finds fainter defects and defects on busier backgrounds (see _Detector).
    sensitivity: float = Field(0.5, ge=0, le=1)
    # Widest scratch or speck (pixels) treated as a defect; wider features are never touched.
    max_defect_px: int = Field(4, ge=2, le=64)
    inpaint: Literal["telea", "ns"] = "telea"
    # A LaMa inpainting model (registry id or path) used instead of OpenCV.
    inpaint_model: str | None = None
    # Compression artefacts: any spandrel 1x restoration model (e.g. FBCNN), id or path.
    artefact_model: str | None = None
    tile: int = Field(256, ge=0)
    overlap: int | Literal["auto"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> RestoreOptions:
        if not (self.colour or self.dust or self.artefact_model):
            raise ValueError("restore does nothing: colour and dust are off and no artefact_model")
        if self.low_percentile >= self.high_percentile:
            raise ValueError("low_percentile: must be below high_percentile")
        if self.inpaint_model is not None and not self.dust:
            raise ValueError("inpaint_model: only used when dust is true")
        check_tiling(self.tile, self.overlap)
        return self


class RestoreStage:
    """Repair what time did to a print: JPEG artefacts, fading, casts, dust and scratches."""

    name: ClassVar[str] = "restore"
    version: ClassVar[int] = 1
    Options: ClassVar[type[StageOptions]] = RestoreOptions

    def __init__(self, options: RestoreOptions | None = None) -> None:
        self.options = options or RestoreOptions()
        self._engines = EngineCache()

    def models(self) -> list[str]:
        opts = self.options
        inpainter = opts.inpaint_model if opts.dust else None
        return [ref for ref in (opts.artefact_model, inpainter) if ref is not None]

    def run(self, image: Image, ctx: StageContext) -> StageResult:
        opts = self.options
        pixels, owned = image.pixels, False
        params: dict[str, Any] = {"artefacts": None, "colour": None, "dust": None}
        done: list[str] = []
        if opts.artefact_model is not None:
            pixels, params["artefacts"] = self._artefacts(pixels, ctx)
            owned = True
            done.append("artefacts")
        mask = None
        if opts.colour:
            pixels, params["colour"], changed = _correct_colour(
                pixels, image.alpha, opts, pixels if owned else None, ctx.scratch_dir
            )
            owned = owned or changed
            if changed:
                done.append("colour")
        if opts.dust:
            pixels, mask, params["dust"] = self._dust(pixels, ctx, owned)
            if mask is not None:
                done.append("dust")
        params["parts"] = done
        if not done:
            return StageResult(image=image, params=params, skipped=_nothing_done(opts))
        return StageResult(image=image.replace(pixels=pixels), params=params, mask=mask)

    # --- compression artefacts

    def _artefacts(self, pixels: np.ndarray, ctx: StageContext) -> tuple[np.ndarray, dict]:
        opts = self.options
        ref = opts.artefact_model
        assert ref is not None
        load = registered_loader(ctx, ref, _require_restorer)
        engine, params = self._engines.get(ref, ctx, opts.precision, load)
        grey = pixels.shape[2] == 1
        via_rgb = grey and engine.in_channels == 3
        if not grey and engine.in_channels == 1:
            raise StageError(f"restore: artefact model {ref} takes greyscale input only")
        source = np.repeat(pixels, 3, axis=2) if via_rgb else pixels
        overlap = auto_overlap(engine.descriptor) if opts.overlap == "auto" else opts.overlap
        settings = TileSettings(tile=opts.tile, overlap=overlap, scratch_dir=ctx.scratch_dir)
        tiled = run_tiled(engine, source, settings, progress=ctx.progress)
        out = luma(tiled.pixels, settings) if via_rgb else tiled.pixels
        tile = tiled.tile if opts.tile else 0
        extra = {"tile": tile, "overlap": overlap, "greyscale_via_rgb": via_rgb}
        return out.reshape(pixels.shape), {**params, **extra}

    # --- dust and scratches

    def _dust(
        self, pixels: np.ndarray, ctx: StageContext, owned: bool
    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
        opts = self.options
        detector = _Detector.from_options(opts.sensitivity, opts.max_defect_px)
        mask, found = _detect_defects(pixels, detector)
        repaired = int(np.count_nonzero(mask))
        params: dict[str, Any] = {
            "sensitivity": opts.sensitivity,
            "max_defect_px": opts.max_defect_px,
            "defects": found,
            "repaired_pixels": repaired,
            "inpaint": opts.inpaint if opts.inpaint_model is None else "model",
        }
        if not repaired:
            return pixels, None, params
        out = pixels if owned else _copy(pixels, ctx.scratch_dir)
        if opts.inpaint_model is None:
            _inpaint_opencv(out, mask, opts.inpaint, detector.radius)
        else:
            params.update(self._inpaint_learned(out, mask, ctx))
        return out, mask, params

    def _inpaint_learned(self, out: np.ndarray, mask: np.ndarray, ctx: StageContext) -> dict:
        opts = self.options
        ref = opts.inpaint_model
        assert ref is not None
        load = registered_loader(ctx, ref, _require_inpainter)
        engine, params = self._engines.get(ref, ctx, opts.precision, load)
        for core, padded in _tiles_with_mask(mask, _LAMA_TILE, _LAMA_CONTEXT):
            _inpaint_tile_lama(engine, out, mask, core, padded)
        return {f"inpaint_{key}": value for key, value in params.items()}


def _nothing_done(opts: RestoreOptions) -> str:
    reasons = []
    if opts.colour:
        reasons.append("already balanced")
    if opts.dust:
        reasons.append("no defects found")
    return ", ".join(reasons)


def _require_restorer(descriptor: Any, ref: str) -> None:
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale != 1:
        kind = getattr(getattr(descriptor, "architecture", None), "id", "not an image model")
        raise StageError(f"restore: artefact model {ref} is not a 1x restoration model ({kind})")


def _require_inpainter(descriptor: Any, ref: str) -> None:
    if not isinstance(descriptor, spandrel.MaskedImageModelDescriptor):
        kind = getattr(getattr(descriptor, "architecture", None), "id", "not an image model")
        raise StageError(f"restore: inpaint model {ref} is not an inpainting model ({kind})")


# --- fading and colour cast --------------------------------------------------------------------


def _smoothstep(start: float, value: float) -> float:
    """0 up to `start`, 1 from start + _RAMP, smooth (zero slope at both ends) in between."""
    t = min(max((value - start) / _RAMP, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sample(pixels: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
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


def _correct_colour(
    pixels: np.ndarray,
    alpha: np.ndarray | None,
    opts: RestoreOptions,
    out: np.ndarray | None,
    scratch_dir: Path | None,
) -> tuple[np.ndarray, dict, bool]:
    """Per-channel affine levels. White balance draws each channel's black and white points
    towards the darkest black and brightest white of any channel (so no channel is dimmed);
    levels then stretch that common range. Each acts only as far as its ramp allows."""
    sample = _sample(pixels, alpha)
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
    out = _allocate(pixels.shape, scratch_dir) if out is None else out
    gain32, offset32 = gain.astype(np.float32), offset.astype(np.float32)
    for top in range(0, pixels.shape[0], _BAND_ROWS):
        rows = slice(top, top + _BAND_ROWS)
        np.multiply(pixels[rows], gain32, out=out[rows])
        out[rows] += offset32
        np.clip(out[rows], 0.0, 1.0, out=out[rows])
    return out, params, True


def _allocate(shape: tuple[int, ...], scratch_dir: Path | None) -> np.ndarray:
    return buffers.allocate(
        shape, np.float32, max_bytes_in_ram=_MAX_BYTES_IN_RAM, scratch_dir=scratch_dir
    )


def _copy(pixels: np.ndarray, scratch_dir: Path | None) -> np.ndarray:
    out = _allocate(pixels.shape, scratch_dir)
    for top in range(0, pixels.shape[0], _BAND_ROWS):
        out[top : top + _BAND_ROWS] = pixels[top : top + _BAND_ROWS]
    return out


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


# --- dust and scratch detection ----------------------------------------------------------------


@dataclass(frozen=True)
class _Detector:
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
    def from_options(cls, sensitivity: float, max_defect_px: int) -> _Detector:
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
    return pixels @ _LUMA


def _detect_defects(pixels: np.ndarray, detector: _Detector) -> tuple[np.ndarray, int]:
    """A uint8 mask (255 = defect, dilated by a pixel to cover anti-aliased fringes) of thin
    bright or dark defects in `pixels` (H, W, C float32), analysed band by band, and how many
    defects it holds."""
    height, width = pixels.shape[:2]
    sample = _luma(_sample(pixels, None)[:, None, :])
    extremes = tuple(float(v) for v in np.percentile(sample, [0.5, 99.5]))
    mask = np.zeros((height, width), np.uint8)
    margin, found = detector.margin, 0
    for top in range(0, height, _BAND_ROWS):
        bottom = min(height, top + _BAND_ROWS)
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


def _detect_in_band(band: _Band, bright: bool, detector: _Detector, mask: np.ndarray) -> int:
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
    planes: _Planes, label: int, stat: np.ndarray, peak: float, detector: _Detector
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


def _shape_ok(component: np.ndarray, detector: _Detector) -> bool:
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
    component: np.ndarray, box: tuple[int, int, int, int], detector: _Detector
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

    def accepted(self, detector: _Detector) -> bool:
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


# --- inpainting ----------------------------------------------------------------------------------

_INPAINT_TILE = 256
_LAMA_TILE, _LAMA_CONTEXT = 384, 64


def _tiles_with_mask(
    mask: np.ndarray, tile: int, context: int
) -> Iterator[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """(core, padded) slices of each tile holding masked pixels; the padding gives the
    inpainter the surroundings it reads, so tiles agree where they meet."""
    height, width = mask.shape
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            core = (slice(top, min(height, top + tile)), slice(left, min(width, left + tile)))
            if not mask[core].any():
                continue
            padded = (
                slice(max(0, top - context), min(height, top + tile + context)),
                slice(max(0, left - context), min(width, left + tile + context)),
            )
            yield core, padded


def _inpaint_opencv(out: np.ndarray, mask: np.ndarray, method: str, radius: int) -> None:
    """Fill the masked pixels of `out` in place, tile by tile, channel by channel.

    Telea runs on 16-bit samples: OpenCV 5's float32 Telea returns values far outside the
    neighbours' range (measured: 1.9 for neighbours near 0.9), while its 16-bit path is sound
    and keeps 16-bit masters at their own precision. Navier-Stokes runs in float32."""
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    reach = max(3, radius + 1)
    for core, padded in _tiles_with_mask(mask, _INPAINT_TILE, 4 * reach + 8):
        holes = np.ascontiguousarray(mask[padded])
        inner = _inner(core, padded)
        chosen = holes[inner] > 0
        for channel in range(out.shape[2]):
            source = out[padded[0], padded[1], channel]
            if flag == cv2.INPAINT_TELEA:
                samples = np.rint(source * 65535.0).astype(np.uint16)
                filled = cv2.inpaint(samples, holes, reach, flag).astype(np.float32) / 65535.0
            else:
                filled = cv2.inpaint(np.ascontiguousarray(source), holes, reach, flag)
            target = out[core[0], core[1], channel]  # a view: writes land in `out`
            target[chosen] = np.clip(filled[inner][chosen], 0.0, 1.0)


def _inner(core: tuple[slice, slice], padded: tuple[slice, slice]) -> tuple[slice, slice]:
    """`core` in the coordinates of the `padded` crop."""
    return tuple(
        slice(c.start - p.start, c.stop - p.start) for c, p in zip(core, padded, strict=True)
    )  # type: ignore[return-value]


@torch.inference_mode()
def _inpaint_tile_lama(
    engine: Engine,
    out: np.ndarray,
    mask: np.ndarray,
    core: tuple[slice, slice],
    padded: tuple[slice, slice],
) -> None:
    """Fill one tile's masked pixels with an inpainting model, reading the padded context."""
    crop = out[padded]
    grey = crop.shape[2] == 1
    rgb = np.repeat(crop, 3, axis=2) if grey else crop
    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    holes = torch.from_numpy((mask[padded] > 0).astype(np.float32))[None, None]
    image, holes = image.to(engine.device), holes.to(engine.device)
    dtype = torch.float16 if engine.precision == "fp16" else torch.float32
    image, holes = image.to(dtype), holes.to(dtype)
    if engine.precision == "bf16":
        with torch.autocast(engine.device.type, dtype=torch.bfloat16):
            result = engine.descriptor(image, holes)
    else:
        result = engine.descriptor(image, holes)
    filled = result[0].float().clamp_(0, 1).cpu().numpy().transpose(1, 2, 0)
    if grey:
        filled = (filled @ _LUMA)[:, :, None]
    inner = _inner(core, padded)
    chosen = mask[core] > 0
    target = out[core]
    target[chosen] = filled[inner][chosen]
