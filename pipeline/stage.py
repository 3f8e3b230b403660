"""The Stage protocol: what every processing step in a chain provides and returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.image import Image


class StageOptions(BaseModel):
    """Base for every stage's options: typed, frozen, and unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_tiling(tile: int, overlap: int | str) -> None:
    """The tile and overlap rules every tiled stage shares (ValueError "key: reason")."""
    if 0 < tile < 32:
        raise ValueError("tile: must be 0 (whole image) or at least 32")
    if isinstance(overlap, int) and overlap < 0:
        raise ValueError('overlap: must be >= 0 or "auto"')
    if tile and isinstance(overlap, int) and overlap > tile:
        raise ValueError("overlap: must not exceed the tile")


@dataclass(frozen=True)
class StageContext:
    """What a stage may use besides its image: no global config, no files of its own choosing."""

    models: Any  # pipeline.models.ModelStore; typed loosely to keep this module import-light
    device: str = "cpu"
    precision: str = "auto"
    engine: str = "auto"  # [processing].engine: what a stage with no `engine` of its own uses
    seed: int = 0
    progress: Callable[[int, int], None] | None = None  # tiles done, of total
    on_stage: Callable[[str], None] | None = None  # a chain calls it as each stage starts
    scratch_dir: Any = None  # a folder for disk-backed buffers of very large images


@dataclass(frozen=True)
class StageResult:
    """A stage's output image and every parameter that shaped it (JSON-serialisable)."""

    image: Image
    params: Mapping[str, Any]
    skipped: str | None = None  # why the stage did nothing, if it did nothing
    mask: np.ndarray | None = field(default=None, repr=False)  # pixels the stage invented


@runtime_checkable
class Stage(Protocol):
    """A step of the chain. Construction is cheap: weights load on first `run`."""

    name: ClassVar[str]
    version: ClassVar[int]
    Options: ClassVar[type[StageOptions]]

    def models(self) -> list[str]:
        """Model refs (ids or paths) the stage will load, so weights are checked up front."""
        ...

    def run(self, image: Image, ctx: StageContext) -> StageResult: ...
