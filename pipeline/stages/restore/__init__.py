"""Restoration of scanned prints, each part switchable: compression artefacts (an optional
learned model), fading and colour cast (levels and white balance from robust percentiles, only
where the picture gives evidence of them), and dust and scratches (detected, inpainted, and
reported as a mask of invented pixels)."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import spandrel
from pydantic import Field, model_validator

from pipeline.errors import StageError
from pipeline.image import Image
from pipeline.stage import StageContext, StageOptions, StageResult, check_tiling
from pipeline.stages.engines import (
    DEFAULT_ENGINE_MEMORY_MB,
    EngineCache,
    centre_tile,
    registered_loader,
)
from pipeline.stages.restore.colour import correct_colour
from pipeline.stages.restore.inpaint import (
    LAMA_CONTEXT,
    LAMA_TILE,
    inpaint_opencv,
    inpaint_tile_lama,
    tiles_with_mask,
)
from pipeline.stages.restore.learned import LEARNED_OVERLAP, detect_learned
from pipeline.stages.restore.scratches import Detector, detect_defects
from pipeline.stages.restore.shared import copy_pixels
from pipeline.tiling import TileSettings, luma, overlap_for, run_tiled

__all__ = ["RestoreOptions", "RestoreStage"]


class RestoreOptions(StageOptions):
    # Fading and colour cast: white balance and levels from the low/high percentiles of each
    # channel, applied only when the measured cast or fade passes its threshold (ramping to
    # full strength 0.1 above it), so a balanced image is left exactly as it is, and only when
    # the picture's own evidence says cast or fade (restore/colour.py): toned, monochrome,
    # low-key, high-key and saturated pictures keep their colours.
    colour: bool = True
    # Largest cast left alone: how far one channel's black or white point lies from the
    # darkest black / brightest white of any channel, as a share of that range.
    cast_threshold: float = Field(0.30, ge=0, le=1)
    # Largest fade left alone: the share of 0..1 the image's tonal range no longer spans.
    fade_threshold: float = Field(0.25, ge=0, le=1)
    low_percentile: float = Field(0.5, ge=0, lt=50)
    high_percentile: float = Field(99.5, gt=50, le=100)
    # Dust and scratches: thin bright or dark defects, found and inpainted.
    dust: bool = True
    # "learned": a DefectUNet (detector_model: id or path, trained with training/) run tiled
    # over the luma (or the RGB, for a colour network), its probability cut at `threshold`;
    # "classic": the top-hat detector on the luma
    # (scratches.py) tuned by `sensitivity`. No trained DefectUNet ships yet: the one trained
    # so far marks highlights and texture (README, "Learned dust detector").
    detector: Literal["learned", "classic"] = "classic"
    detector_model: str | None = None
    threshold: float = Field(0.5, gt=0, lt=1)
    # 0..1: higher also finds fainter defects and defects on busier backgrounds (see Detector).
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
    # The engine of the artefact model and the learned detector: auto measures each engine on
    # a tile of the image and keeps the fastest agreeing with torch fp32 at >= 50 dB. None: the
    # context's ([processing].engine). LaMa stays on torch: it takes the image and the mask,
    # and the converted engines run image -> image.
    engine: Literal["auto", "torch", "ncnn", "openvino"] | None = None
    engine_memory_mb: int = Field(DEFAULT_ENGINE_MEMORY_MB, ge=64)

    @model_validator(mode="after")
    def _check(self) -> RestoreOptions:
        if not (self.colour or self.dust or self.artefact_model):
            raise ValueError("restore does nothing: colour and dust are off and no artefact_model")
        if self.low_percentile >= self.high_percentile:
            raise ValueError("low_percentile: must be below high_percentile")
        if self.inpaint_model is not None and not self.dust:
            raise ValueError("inpaint_model: only used when dust is true")
        if self.dust and self.detector == "learned" and self.detector_model is None:
            raise ValueError("detector_model: required by the learned detector (id or path)")
        check_tiling(self.tile, self.overlap)
        return self


class RestoreStage:
    """Repair what time did to a print: JPEG artefacts, fading, casts, dust and scratches."""

    name: ClassVar[str] = "restore"
    version: ClassVar[int] = 5
    Options: ClassVar[type[StageOptions]] = RestoreOptions

    def __init__(self, options: RestoreOptions | None = None) -> None:
        self.options = options or RestoreOptions()
        self._engines = EngineCache()

    def models(self) -> list[str]:
        opts = self.options
        inpainter = opts.inpaint_model if opts.dust else None
        detector = opts.detector_model if opts.dust and opts.detector == "learned" else None
        return [ref for ref in (opts.artefact_model, detector, inpainter) if ref is not None]

    def run(self, image: Image, ctx: StageContext) -> StageResult:
        opts = self.options
        pixels, owned = image.pixels, False
        params: dict[str, Any] = {"artefacts": None, "colour": None, "dust": None}
        done: list[str] = []
        if opts.artefact_model is not None:
            pixels, params["artefacts"] = self._artefacts(pixels, ctx, image.bit_depth)
            owned = True
            done.append("artefacts")
        mask = None
        if opts.colour:
            pixels, params["colour"], changed = correct_colour(
                pixels, image.alpha, opts, pixels if owned else None, ctx.scratch_dir
            )
            owned = owned or changed
            if changed:
                done.append("colour")
        if opts.dust:
            pixels, mask, params["dust"] = self._dust(pixels, ctx, owned, image.bit_depth)
            if mask is not None:
                done.append("dust")
        params["parts"] = done
        if not done:
            return StageResult(image=image, params=params, skipped=_nothing_done(opts))
        return StageResult(image=image.replace(pixels=pixels), params=params, mask=mask)

    # --- compression artefacts

    def _artefacts(
        self, pixels: np.ndarray, ctx: StageContext, bit_depth: int
    ) -> tuple[np.ndarray, dict]:
        opts = self.options
        ref = opts.artefact_model
        assert ref is not None
        load = registered_loader(ctx, ref, _require_restorer)
        engine, params = self._engine(ref, load, pixels, ctx, opts.overlap, bit_depth)
        grey = pixels.shape[2] == 1
        via_rgb = grey and engine.in_channels == 3
        if not grey and engine.in_channels == 1:
            raise StageError(f"restore: artefact model {ref} takes greyscale input only")
        source = np.repeat(pixels, 3, axis=2) if via_rgb else pixels
        overlap = overlap_for(engine, opts.overlap)
        settings = TileSettings(tile=opts.tile, overlap=overlap, scratch_dir=ctx.scratch_dir)
        tiled = run_tiled(engine, source, settings, progress=ctx.progress)
        out = luma(tiled.pixels, settings) if via_rgb else tiled.pixels
        tile = tiled.tile if opts.tile else 0
        extra = {"tile": tile, "overlap": overlap, "greyscale_via_rgb": via_rgb}
        return out.reshape(pixels.shape), {**params, **extra}

    # --- dust and scratches

    def _dust(
        self, pixels: np.ndarray, ctx: StageContext, owned: bool, bit_depth: int
    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
        opts = self.options
        detector = Detector.from_options(opts.sensitivity, opts.max_defect_px)
        params: dict[str, Any] = {"detector": opts.detector, "max_defect_px": opts.max_defect_px}
        if opts.detector == "learned":
            mask, learned = self._detect_learned(pixels, ctx, bit_depth)
            params.update(learned, threshold=opts.threshold)
            found = _count_defects(mask)
        else:
            mask, found = detect_defects(pixels, detector)
            params["sensitivity"] = opts.sensitivity
        repaired = int(np.count_nonzero(mask))
        params.update(
            defects=found,
            repaired_pixels=repaired,
            inpaint=opts.inpaint if opts.inpaint_model is None else "model",
        )
        if not repaired:
            return pixels, None, params
        out = pixels if owned else copy_pixels(pixels, ctx.scratch_dir)
        if opts.inpaint_model is None:
            inpaint_opencv(out, mask, opts.inpaint, detector.radius)
        else:
            params.update(self._inpaint_learned(out, mask, ctx))
        return out, mask, params

    def _detect_learned(
        self, pixels: np.ndarray, ctx: StageContext, bit_depth: int
    ) -> tuple[np.ndarray, dict]:
        opts = self.options
        ref = opts.detector_model
        assert ref is not None  # the options require it for the learned detector
        load = registered_loader(ctx, ref, _require_detector)
        engine, params = self._engine(ref, load, pixels, ctx, LEARNED_OVERLAP, bit_depth)
        mask, tiling = detect_learned(
            pixels, engine, opts.threshold, opts.tile, ctx.scratch_dir, ctx.progress
        )
        return mask, {**{f"detector_{k}": v for k, v in params.items()}, **tiling}

    def _engine(
        self,
        ref: str,
        load: Any,
        pixels: np.ndarray,
        ctx: StageContext,
        overlap: int | str,
        bit_depth: int,
    ) -> tuple[Any, dict[str, Any]]:
        """A model's engine; `auto` calibrates on a tile from the middle of `pixels`."""
        opts = self.options
        sample = partial(centre_tile, pixels, tile=opts.tile, overlap=overlap)
        return self._engines.for_stage(ref, ctx, opts, load, sample, bit_depth)

    def _inpaint_learned(self, out: np.ndarray, mask: np.ndarray, ctx: StageContext) -> dict:
        opts = self.options
        ref = opts.inpaint_model
        assert ref is not None
        load = registered_loader(ctx, ref, _require_inpainter)
        engine, params = self._engines.get(ref, ctx, opts.precision, load)
        for core, padded in tiles_with_mask(mask, LAMA_TILE, LAMA_CONTEXT):
            inpaint_tile_lama(engine, out, mask, core, padded)
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


def _count_defects(mask: np.ndarray) -> int:
    """Connected defects in the mask, counted on a copy at most 2048 px wide (memory stays
    small on any scan; defects closer than the reduction merge)."""
    height, width = mask.shape
    step = max(1, -(-max(height, width) // 2048))
    small = np.ascontiguousarray(mask[::step, ::step])
    if step > 1:
        small = cv2.dilate(small, np.ones((2, 2), np.uint8))
    return int(cv2.connectedComponents((small > 0).view(np.uint8), connectivity=8)[0]) - 1


def _require_detector(descriptor: Any, ref: str) -> None:
    if getattr(getattr(descriptor, "architecture", None), "id", None) != "DefectUNet":
        kind = getattr(getattr(descriptor, "architecture", None), "id", "not an image model")
        raise StageError(f"restore: detector model {ref} is not a DefectUNet ({kind})")


def _require_inpainter(descriptor: Any, ref: str) -> None:
    if not isinstance(descriptor, spandrel.MaskedImageModelDescriptor):
        kind = getattr(getattr(descriptor, "architecture", None), "id", "not an image model")
        raise StageError(f"restore: inpaint model {ref} is not an inpainting model ({kind})")
