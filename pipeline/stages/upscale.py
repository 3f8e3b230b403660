"""Super-resolution stage: a spandrel SR model at its native scale, tiled, then resampled to the
requested factor (as upstream Real-ESRGAN's `outscale` does)."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import spandrel
import torch
from pydantic import Field, model_validator

from pipeline import resample
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

__all__ = ["UpscaleOptions", "UpscaleStage"]

# The general v3 model's "weak denoise" twin; upstream interpolates their weights.
DENOISE_TWINS = {"realesr-general-x4v3": "realesr-general-wdn-x4v3"}


class UpscaleOptions(StageOptions):
    model: str = "realesrgan-x4plus"
    scale: float = Field(4.0, gt=0, le=8)
    denoise_strength: float | None = Field(None, ge=0, le=1)
    denoise_model: str | None = None
    tile: int = Field(256, ge=0)
    overlap: int | Literal["auto"] = "auto"
    batch: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    compile: bool = False
    # torch, ncnn (fp32 CPU, falls back to torch with the reason when it cannot convert), or
    # auto: the fastest engine agreeing with torch fp32 on this machine, measured once.
    # None: the context's ([processing].engine).
    engine: Literal["auto", "torch", "ncnn", "openvino"] | None = None
    engine_memory_mb: int = Field(DEFAULT_ENGINE_MEMORY_MB, ge=64)
    max_ram_output_mb: int = Field(256, ge=16)

    @model_validator(mode="after")
    def _check(self) -> UpscaleOptions:
        check_tiling(self.tile, self.overlap)
        if (
            self.denoise_strength is not None
            and self.denoise_model is None
            and self.model not in DENOISE_TWINS
        ):
            raise ValueError(
                "denoise_strength: only for realesr-general-x4v3, or give denoise_model"
            )
        return self


class UpscaleStage:
    """Upscale by `scale` with a super-resolution model; alpha is resized separately."""

    name: ClassVar[str] = "upscale"
    version: ClassVar[int] = 1
    Options: ClassVar[type[StageOptions]] = UpscaleOptions

    def __init__(self, options: UpscaleOptions | None = None) -> None:
        self.options = options or UpscaleOptions()
        self._engines = EngineCache()

    def models(self) -> list[str]:
        opts = self.options
        if opts.denoise_strength is None:
            return [opts.model]
        return [opts.model, opts.denoise_model or DENOISE_TWINS[opts.model]]

    def run(self, image: Image, ctx: StageContext) -> StageResult:
        opts = self.options
        engine, model_params = self.engine_for(image, ctx)
        rgb = image.channels == 1 and engine.in_channels == 3
        if image.channels == 3 and engine.in_channels == 1:
            raise StageError(f"upscale: model {opts.model} takes greyscale input only")
        source = np.repeat(image.pixels, 3, axis=2) if rgb else image.pixels
        overlap = overlap_for(engine, opts.overlap)
        settings = TileSettings(
            tile=opts.tile,
            overlap=overlap,
            batch=opts.batch,
            max_bytes_in_ram=opts.max_ram_output_mb << 20,
            scratch_dir=ctx.scratch_dir,
        )
        fallbacks = getattr(engine, "fp32_fallbacks", 0)
        tiled = run_tiled(engine, source, settings, progress=ctx.progress)
        if engine.precision == "fp16":  # tiles run again in fp32 after a NaN/black fp16 output
            model_params = {
                **model_params,
                "fp32_fallback_tiles": engine.fp32_fallbacks - fallbacks,
            }
        size = (round(image.width * opts.scale), round(image.height * opts.scale))
        pixels = _resample(tiled.pixels, size, settings)
        if rgb:
            pixels = luma(pixels, settings)
        alpha = None
        if image.alpha is not None:
            alpha = resample.resize(
                image.alpha,
                size,
                cv2.INTER_LINEAR,
                max_bytes_in_ram=settings.max_bytes_in_ram,
                scratch_dir=settings.scratch_dir,
            )
        params = {
            **model_params,
            "native_scale": engine.scale,
            "scale": opts.scale,
            "output_size": [size[0], size[1]],
            "resample": _resample_name(engine.scale, opts.scale),
            "tile": tiled.tile if opts.tile else 0,
            "overlap": overlap,
            "batch": opts.batch,
            "alpha": "bilinear" if alpha is not None else None,
            "greyscale_via_rgb": rgb,
        }
        return StageResult(image=image.replace(pixels=pixels, alpha=alpha), params=params)

    def engine_for(self, image: Image, ctx: StageContext) -> tuple[Engine, dict[str, Any]]:
        """Load (once per device, precision and engine) the model, or the interpolated pair;
        `auto` calibrates on a tile of this image (`scanrestore models bench` shows it)."""
        opts = self.options
        if opts.denoise_strength is None:
            load = registered_loader(ctx, opts.model, _require_sr)
        else:
            load = partial(self._load_interpolated, ctx)
        sample = partial(self._sample, image)
        return self._engines.for_stage(opts.model, ctx, opts, load, sample, image.bit_depth)

    def _sample(self, image: Image, descriptor: Any) -> np.ndarray:
        if image.channels == 3 and descriptor.input_channels == 1:
            raise StageError(f"upscale: model {self.options.model} takes greyscale input only")
        return centre_tile(image.pixels, descriptor, self.options.tile, self.options.overlap)

    def _load_interpolated(
        self, ctx: StageContext, device: str, dtype: torch.dtype
    ) -> tuple[Any, dict[str, Any]]:
        """realesr-general-x4v3 blended with its weak-denoise twin, as upstream's dni does."""
        opts = self.options
        twin = opts.denoise_model or DENOISE_TWINS[opts.model]
        general, general_ref = ctx.models.load_state_dict(opts.model)
        weak, weak_ref = ctx.models.load_state_dict(twin)
        blended = _interpolate(general, weak, opts.denoise_strength, opts.model, twin)
        descriptor = spandrel.ModelLoader(device).load_from_state_dict(blended).eval()
        if dtype == torch.float16:
            descriptor = descriptor.half()
        _require_sr(descriptor, opts.model)
        return descriptor, {
            "model": general_ref.id,
            "model_sha256": general_ref.sha256,
            "denoise_model": weak_ref.id,
            "denoise_model_sha256": weak_ref.sha256,
            "denoise_strength": opts.denoise_strength,
            "architecture": descriptor.architecture.id,
        }


def _interpolate(
    strong: dict[str, torch.Tensor],
    weak: dict[str, torch.Tensor],
    strength: float,
    strong_id: str,
    weak_id: str,
) -> dict[str, torch.Tensor]:
    """Blend two state dicts of one architecture: strength 1 is the strong denoiser, 0 the
    weak one (upstream's dni weights [strength, 1 - strength])."""
    if strong.keys() != weak.keys():
        raise StageError(f"upscale: {strong_id} and {weak_id} are not the same architecture")
    blended = {}
    for key, value in strong.items():
        if value.shape != weak[key].shape:
            raise StageError(f"upscale: {strong_id} and {weak_id} differ in shape at {key}")
        blended[key] = strength * value.float() + (1.0 - strength) * weak[key].float()
    return blended


def _require_sr(descriptor: Any, model: str) -> None:
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale < 2:
        raise StageError(
            f"upscale: model {model} is not a super-resolution model "
            f"({descriptor.architecture.id}, scale {descriptor.scale})"
        )


def _resample_name(native: int, scale: float) -> str | None:
    if scale == native:
        return None
    return "area" if scale < native else "lanczos4"


def _resample(pixels: np.ndarray, size: tuple[int, int], settings: TileSettings) -> np.ndarray:
    """Resize the model's native-scale output to the requested size, band by band. Area
    averaging when shrinking (Lanczos aliases there), Lanczos when enlarging, as upstream."""
    if (pixels.shape[1], pixels.shape[0]) == size:
        return pixels
    shrinking = size[0] < pixels.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    return resample.resize(
        pixels,
        size,
        interpolation,
        max_bytes_in_ram=settings.max_bytes_in_ram,
        scratch_dir=settings.scratch_dir,
    )
