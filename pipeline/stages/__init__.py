"""The registry of stage kinds: an explicit dict, one entry per stage class."""

from __future__ import annotations

from pipeline.stage import Stage
from pipeline.stages.denoise import DenoiseStage
from pipeline.stages.face import FaceStage
from pipeline.stages.restore import RestoreStage
from pipeline.stages.upscale import UpscaleStage

__all__ = ["STAGES", "register"]

STAGES: dict[str, type[Stage]] = {}


def register(stage: type[Stage]) -> type[Stage]:
    """Add a stage class under its `name`; a second class with the same name is an error."""
    if stage.name in STAGES:
        raise ValueError(f"stage kind {stage.name!r} is already registered")
    STAGES[stage.name] = stage
    return stage


register(DenoiseStage)
register(FaceStage)
register(RestoreStage)
register(UpscaleStage)
