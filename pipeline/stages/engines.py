"""Engines for model stages: load the weights, pick the precision, build one engine per
(model, device, precision) and keep it for the stage's lifetime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline.stage import StageContext
from pipeline.tiling import Engine, resolve_device, resolve_precision

__all__ = ["EngineCache", "Loader", "registered_loader"]

# (device, dtype) -> (spandrel descriptor on that device in that dtype, params naming the model)
Loader = Callable[[str, torch.dtype], tuple[Any, dict[str, Any]]]


class EngineCache:
    """Engines built on first use; a stage owns one, so construction stays free of I/O."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str, str, str], tuple[Engine, dict[str, Any]]] = {}

    def get(
        self, ref: str, ctx: StageContext, precision: str, load: Loader, *, compile: bool = False
    ) -> tuple[Engine, dict[str, Any]]:
        """The engine for `ref` on the context's device; `precision` "auto" defers to the
        context's. fp16 loads a half copy (the store shares fp32 weights between stages)."""
        device = resolve_device(ctx.device)
        wanted = precision if precision != "auto" else ctx.precision
        key = (ref, device, wanted)
        if key not in self._engines:
            descriptor, params = load(device, torch.float32)
            chosen = resolve_precision(wanted, device, descriptor)
            if chosen == "fp16":
                descriptor, params = load(device, torch.float16)
            engine = Engine(descriptor, device=device, precision=chosen, compile=compile)
            params = {**params, "device": device, "precision": chosen, "compiled": compile}
            self._engines[key] = (engine, params)
        return self._engines[key]


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
