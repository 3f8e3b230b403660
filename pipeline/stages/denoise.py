"""Denoising stage: OpenCV non-local means (no weights), DnCNN, or any spandrel restoration model,
blended with the input by `strength` so film grain can be kept."""

from __future__ import annotations

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
from pipeline.tiling import Engine, TileSettings, luma, overlap_for, run_tiled

__all__ = ["DenoiseOptions", "DenoiseStage"]


class DenoiseOptions(StageOptions):
    method: Literal["nlm", "dncnn", "model"] = "nlm"
    strength: float = Field(1.0, ge=0, le=1)
    # nlm: filter strength in 8-bit levels (OpenCV's h, for an L1 patch distance).
    h: float = Field(8.0, gt=0, le=50)
    # dncnn/model: weights by registry id or path. DnCNN picks `grey_model` for greyscale
    # images when it is set, else runs the colour model on the grey replicated to RGB.
    model: str | None = None
    grey_model: str | None = None
    tile: int = Field(256, ge=0)
    overlap: int | Literal["auto"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # As upscale's: torch, ncnn or auto; None uses the context's ([processing].engine).
    engine: Literal["auto", "torch", "ncnn", "openvino"] | None = None
    engine_memory_mb: int = Field(DEFAULT_ENGINE_MEMORY_MB, ge=64)

    @model_validator(mode="after")
    def _check(self) -> DenoiseOptions:
        if self.method == "model" and self.model is None:
            raise ValueError('model: required when method is "model" (an id or a path)')
        if self.method == "nlm" and (self.model or self.grey_model):
            raise ValueError("model: nlm uses no weights; choose method dncnn or model")
        check_tiling(self.tile, self.overlap)
        return self


class DenoiseStage:
    """Remove sensor/film noise; `strength` below 1 keeps part of the original grain."""

    name: ClassVar[str] = "denoise"
    version: ClassVar[int] = 1
    Options: ClassVar[type[StageOptions]] = DenoiseOptions

    def __init__(self, options: DenoiseOptions | None = None) -> None:
        self.options = options or DenoiseOptions()
        self._engines = EngineCache()

    def models(self) -> list[str]:
        opts = self.options
        if opts.method == "nlm":
            return []
        default = "dncnn-color-blind" if opts.method == "dncnn" else None
        return [ref for ref in (opts.model or default, opts.grey_model) if ref is not None]

    def run(self, image: Image, ctx: StageContext) -> StageResult:
        opts = self.options
        if opts.method == "nlm":
            denoised, params = _nlm(image, opts.h), {"h": opts.h}
        else:
            denoised, params = self._learned(image, ctx)
        if opts.strength < 1.0:
            denoised = opts.strength * denoised + (1.0 - opts.strength) * image.pixels
        pixels = np.clip(denoised, 0.0, 1.0).astype(np.float32, copy=False)
        params = {"method": opts.method, "strength": opts.strength, **params}
        return StageResult(image=image.replace(pixels=pixels), params=params)

    def _learned(self, image: Image, ctx: StageContext) -> tuple[np.ndarray, dict[str, Any]]:
        opts = self.options
        grey = image.channels == 1
        ref = opts.grey_model if grey and opts.grey_model else opts.model
        ref = ref or ("dncnn-color-blind" if opts.method == "dncnn" else None)
        engine, params = self._engine(ref, image, ctx)
        source = image.pixels
        via_rgb = grey and engine.in_channels == 3
        if via_rgb:
            source = np.repeat(source, 3, axis=2)
        elif not grey and engine.in_channels == 1:
            raise StageError(f"denoise: model {ref} takes greyscale input; set model for colour")
        overlap = overlap_for(engine, opts.overlap)
        settings = TileSettings(tile=opts.tile, overlap=overlap, scratch_dir=ctx.scratch_dir)
        tiled = run_tiled(engine, source, settings, progress=ctx.progress)
        out = luma(tiled.pixels, settings) if via_rgb else tiled.pixels
        out = out.reshape(image.pixels.shape)
        tile = tiled.tile if opts.tile else 0
        return out, {**params, "tile": tile, "overlap": overlap, "greyscale_via_rgb": via_rgb}

    def _engine(self, ref: str, image: Image, ctx: StageContext) -> tuple[Engine, dict[str, Any]]:
        opts = self.options
        load = registered_loader(ctx, ref, _require_denoiser)
        return self._engines.for_stage(
            ref,
            ctx,
            opts,
            load,
            lambda model: centre_tile(image.pixels, model, opts.tile, opts.overlap),
            image.bit_depth,
        )


def _require_denoiser(descriptor: Any, ref: str) -> None:
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale != 1:
        kind = getattr(getattr(descriptor, "architecture", None), "id", "not an image model")
        raise StageError(f"denoise: model {ref} is not a 1x restoration model ({kind})")


def _nlm(image: Image, h: float) -> np.ndarray:
    """OpenCV non-local means in 16 bits with the L1 patch distance, whatever the source depth:
    16-bit masters are never quantised to 8 bits, all channels share one patch distance (no
    colour-space round trip), and `h` means the same for 8- and 16-bit sources. On PolyU's real
    high-ISO pairs this beat OpenCV's 8-bit Lab variant at its usual settings."""
    samples = np.rint(image.pixels * 65535).astype(np.uint16)
    out = cv2.fastNlMeansDenoising(
        samples,
        h=[h * 257.0],  # h is given in 8-bit levels
        templateWindowSize=7,
        searchWindowSize=21,
        normType=cv2.NORM_L1,
    )
    return out.reshape(image.pixels.shape).astype(np.float32) / 65535
