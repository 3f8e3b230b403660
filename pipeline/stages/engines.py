"""Engines for model stages: load the weights, pick the precision and the inference engine
(torch, ncnn, openvino, or `auto`: measured on the machine), build one engine per (model, device,
precision, engine) and keep it for the stage's lifetime."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.runtimes import ENGINES
from pipeline.runtimes.calibration import (
    DECISIONS_NAME,
    calibrate,
    machine,
    recorded_decision,
)
from pipeline.runtimes.ncnn_writer import Unconvertible
from pipeline.stage import StageContext
from pipeline.tiling import (
    Engine,
    TileSettings,
    auto_overlap,
    cpu_has_fast_bf16,
    luma,
    resolve_device,
    resolve_precision,
    vulkan_device,
)

__all__ = [
    "DEFAULT_ENGINE_MEMORY_MB",
    "EngineCache",
    "Loader",
    "centre_tile",
    "registered_loader",
]

log = logging.getLogger(__name__)

# (device, dtype) -> (spandrel descriptor on that device in that dtype, params naming the model)
Loader = Callable[[str, torch.dtype], tuple[Any, dict[str, Any]]]
# What one tile may add to resident memory under `auto` (the 16 MP at 4x under 3 GB bound).
DEFAULT_ENGINE_MEMORY_MB = 2048


class EngineCache:
    """Engines built on first use; a stage owns one, so construction stays free of I/O."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str, ...], tuple[Any, dict[str, Any]]] = {}

    def get(
        self,
        ref: str,
        ctx: StageContext,
        precision: str,
        load: Loader,
        *,
        compile: bool = False,
        engine: str = "torch",
        sample: Callable[[Any], np.ndarray] | None = None,
        memory_mb: float = DEFAULT_ENGINE_MEMORY_MB,
        bit_depth: int = 16,
    ) -> tuple[Any, dict[str, Any]]:
        """The engine for `ref` on the context's device; `precision` "auto" defers to the
        context's. fp16 loads a half copy (the store shares fp32 weights between stages).
        `engine` "auto" calibrates on `sample(descriptor)`, a real tile (H, W, C float32); for an
        image of `bit_depth` 8 or less under precision "auto" on a CPU with native bf16 kernels,
        it also times bf16 twins, kept only where they agree with fp32 at >= 50 dB."""
        if engine not in ENGINES:
            raise StageError(f"engine {engine!r}: must be one of {', '.join(ENGINES)}")
        device = resolve_device(ctx.device)
        wanted = precision if precision != "auto" else ctx.precision
        # bf16 keeps 8 bits of mantissa: a candidate for 8-bit images only, never for 16-bit
        # masters (errors of 2^-9, 1/8 of a 12-bit step), and only where the CPU runs it natively
        # (emulated on AVX2, ~10x slower).
        bf16 = wanted == "auto" and bit_depth <= 8 and device == "cpu" and cpu_has_fast_bf16()
        key = (ref, ctx.device, wanted, engine, str(bf16))
        if key not in self._engines:
            base, params = self._torch(ref, device, wanted, load, compile)
            vulkan = vulkan_device(ctx.device)
            if vulkan is not None:
                self._engines[key] = self._vulkan(base, params, ctx, vulkan)
            else:
                self._engines[key] = self._choose(
                    base, params, ctx, engine, sample, memory_mb, bf16
                )
        return self._engines[key]

    def for_stage(
        self,
        ref: str,
        ctx: StageContext,
        options: Any,
        load: Loader,
        sample: Callable[[Any], np.ndarray],
        bit_depth: int,
    ) -> tuple[Any, dict[str, Any]]:
        """`get` as a model stage calls it, from its options: `precision`, `engine` (None: the
        context's [processing].engine), `engine_memory_mb`, and `compile` where it has one."""
        return self.get(
            ref,
            ctx,
            options.precision,
            load,
            compile=getattr(options, "compile", False),
            engine=options.engine or ctx.engine,
            sample=sample,
            memory_mb=options.engine_memory_mb,
            bit_depth=bit_depth,
        )

    def _torch(
        self, ref: str, device: str, wanted: str, load: Loader, compile: bool
    ) -> tuple[Engine, dict[str, Any]]:
        descriptor, params = load(device, torch.float32)
        chosen = resolve_precision(wanted, device, descriptor)
        exact = descriptor  # what an fp16 tile that comes back NaN or black is run again on
        if chosen == "fp16":
            descriptor, params = load(device, torch.float16)
        engine = Engine(
            descriptor, device=device, precision=chosen, compile=compile, fp32_descriptor=exact
        )
        params = {**params, "device": device, "precision": chosen, "compiled": compile}
        return engine, params

    def _vulkan(
        self, base: Engine, params: dict[str, Any], ctx: StageContext, index: int
    ) -> tuple[Any, dict[str, Any]]:
        """ncnn on Vulkan GPU `index` in fp32, asked for by name (device = "vulkan[:N]"): no
        calibration; a model ncnn cannot convert runs on torch on the CPU, the reason recorded."""
        from pipeline.runtimes.ncnn import NcnnEngine, convert_ncnn

        if base.precision != "fp32" or base.compiled:
            reason = f"ncnn on Vulkan runs fp32 uncompiled, not {base.precision}"
            return base, _on_torch(params, "vulkan", reason)
        try:
            files = convert_ncnn(base.descriptor, _weights_key(params), Path(ctx.models.cache_dir))
        except Unconvertible as exc:
            log.warning("%s: not on the Vulkan GPU, using torch: %s", params.get("model"), exc)
            return base, _on_torch(params, "vulkan", f"Unconvertible: {exc}")
        gpu = NcnnEngine(
            base.descriptor, files, threads=torch.get_num_threads(), vulkan_device=index
        )
        return gpu, {
            **params,
            "engine": "ncnn",
            "device": f"vulkan:{index}",
            "gpu": gpu.gpu,
            **_converted_params(gpu.version, gpu.threads, files.sha256),
        }

    def _choose(
        self,
        base: Engine,
        params: dict[str, Any],
        ctx: StageContext,
        engine: str,
        sample: Callable[[Any], np.ndarray] | None,
        memory_mb: float,
        bf16: bool,
    ) -> tuple[Any, dict[str, Any]]:
        torch_params = _on_torch(params)
        if engine == "torch":
            return base, torch_params
        if base.device.type != "cpu" or base.precision != "fp32" or base.compiled:
            reason = (
                f"ncnn and openvino run fp32 on the CPU here, not {base.precision} on {base.device}"
            )
            return base, _on_torch(params, engine, reason)
        cache_dir = Path(ctx.models.cache_dir)
        weights = _weights_key(params)
        # Each candidate as a builder: where the decision is already recorded, only the chosen
        # engine is built (a worker's start skips loading ncnn twice and reading OpenVINO's IR).
        builders: dict[str, Callable[[], Any]] = {"torch": lambda: base}
        versions: dict[str, str] = {"torch": torch.__version__}
        fallbacks: dict[str, str] = {}
        converted: dict[str, dict[str, Any]] = {}
        threads = torch.get_num_threads()
        ncnn_runtime = None
        if engine in ("ncnn", "auto"):
            try:
                from pipeline.runtimes.ncnn import (
                    RUNTIME_REVISION,
                    NcnnEngine,
                    convert_ncnn,
                    ncnn_version,
                )

                ncnn_runtime = RUNTIME_REVISION
                files = convert_ncnn(base.descriptor, weights, cache_dir)
                # With other work on the cores, one ncnn thread per worker can beat several
                # (measured here: 1.5x faster at load 10 on 2 cores): `auto` times both.
                for count in sorted({threads, 1}, reverse=True):
                    label = "ncnn" if count == threads else f"ncnn@{count}"
                    builders[label] = partial(NcnnEngine, base.descriptor, files, threads=count)
                    versions[label] = ncnn_version()
                    converted[label] = _converted_params(versions[label], count, files.sha256)
            except (ImportError, Unconvertible) as exc:
                fallbacks["ncnn"] = f"{type(exc).__name__}: {exc}"
                log.warning("%s: ncnn engine unavailable: %s", params.get("model"), exc)
        if engine in ("openvino", "auto"):
            try:
                from pipeline.runtimes.openvino import (
                    OpenVinoEngine,
                    convert_openvino,
                    openvino_version,
                )

                files = convert_openvino(base.descriptor, weights, cache_dir)
                twins = ("fp32", "bf16") if engine == "auto" and bf16 else ("fp32",)
                for precision in twins:
                    label = "openvino" if precision == "fp32" else "openvino-bf16"
                    builders[label] = partial(
                        OpenVinoEngine, base.descriptor, files, threads=threads, precision=precision
                    )
                    versions[label] = openvino_version()
                    converted[label] = _converted_params(versions[label], threads, files.sha256)
            except (ImportError, Unconvertible) as exc:
                fallbacks["openvino"] = f"{type(exc).__name__}: {exc}"
                log.warning("%s: openvino engine unavailable: %s", params.get("model"), exc)
        if engine == "auto" and bf16 and base.descriptor.supports_bfloat16:
            builders["torch-bf16"] = partial(
                Engine, base.descriptor, device="cpu", precision="bf16"
            )
            versions["torch-bf16"] = torch.__version__
        if engine != "auto" or len(builders) == 1:
            if engine not in builders:  # nothing to measure torch against: torch, and why
                reason = "; ".join(f"{k}: {v}" for k, v in fallbacks.items())
                return base, _on_torch(params, engine, reason)
            return builders[engine](), {**params, "engine": engine, **converted[engine]}
        if sample is None:
            raise StageError("engine auto: calibration needs a sample tile")
        tile = sample(base.descriptor)
        decision_key = {
            "weights": weights,
            "tile": list(tile.shape),
            "threads": threads,
            "machine": machine(),
            "engines": versions,
            "memory_mb": memory_mb,
            "ncnn_runtime": ncnn_runtime,
            "bf16": bf16,
        }
        decisions = cache_dir / "converted" / DECISIONS_NAME
        recorded = recorded_decision(decisions, decision_key, set(builders))
        if recorded is not None:
            choice, measured = recorded
            chosen, cached = builders[choice](), True
        else:
            choice, measured, cached = calibrate(
                builders | {"torch": base},
                tile,
                memory_mb=memory_mb,
                decisions=decisions,
                key=decision_key,
            )
            chosen = builders[choice]()  # built again: calibration holds one candidate at a time
        name = choice.split("@")[0].removesuffix("-bf16")
        chosen_params = torch_params if name == "torch" else {**params, "engine": name}
        if choice.endswith("-bf16"):
            chosen_params = {**chosen_params, "precision": "bf16"}
        calibration = {
            "choice": choice,
            "cached": cached,
            "tile": list(tile.shape[:2]),
            "threads": threads,
            "measurements": [m.__dict__ for m in measured],
            "unavailable": fallbacks,
        }
        return chosen, {
            **chosen_params,
            **converted.get(choice, {}),
            "engine_requested": "auto",
            "engine_calibration": calibration,
        }


def centre_tile(pixels: np.ndarray, descriptor: Any, tile: int, overlap: int | str) -> np.ndarray:
    """The calibration tile: one tile as run_tiled cuts it (tile + overlap a side) from the
    middle of `pixels` (H, W, C), grey repeated to RGB for an RGB model, RGB reduced to luma
    for a one-channel model (the stages run those on the luma)."""
    extra = auto_overlap(descriptor) if overlap == "auto" else int(overlap)
    size = (tile or 256) + extra
    height, width = pixels.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    crop = np.asarray(pixels[top : top + size, left : left + size], dtype=np.float32)
    if crop.shape[2] == 1 and descriptor.input_channels == 3:
        crop = np.repeat(crop, 3, axis=2)
    elif crop.shape[2] == 3 and descriptor.input_channels == 1:
        crop = luma(crop, TileSettings())
    return crop


def _on_torch(
    params: dict[str, Any], requested: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """What provenance records of a model run on torch; when another engine was `requested`,
    that request and the `reason` it fell back."""
    recorded = {**params, "engine": "torch", "engine_version": torch.__version__}
    if requested is not None:
        recorded |= {"engine_requested": requested, "engine_fallback": reason}
    return recorded


def _converted_params(version: str, threads: int, sha256: dict[str, str]) -> dict[str, Any]:
    """What provenance records of a converted engine: its version, threads and files' hashes."""
    return {"engine_version": version, "engine_threads": threads, "converted_sha256": sha256}


def _weights_key(params: dict[str, Any]) -> str:
    """One hash for everything that fixes the network's weights (a blend has two files)."""
    fixed = {k: v for k, v in params.items() if k.endswith("sha256") or k == "denoise_strength"}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


def registered_loader(ctx: StageContext, ref: str, check: Callable[[Any, str], None]) -> Loader:
    """Load `ref` (an id or a path) through the model store, hash-checked, then `check` it."""

    def load(device: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
        loaded = ctx.models.load(ref, device=device, dtype=dtype)
        check(loaded.descriptor, ref)
        return loaded.descriptor, {
            "model": loaded.id,
            "model_sha256": loaded.sha256,
            "architecture": loaded.descriptor.architecture.id,
        }

    return load
