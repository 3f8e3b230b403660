"""Build a chain of stages from plain specs and run it over an image."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pipeline.errors import StageError
from pipeline.image import Image
from pipeline.stage import Stage, StageContext
from pipeline.stages import STAGES

__all__ = ["Chain", "ChainConfigError", "ChainResult", "StageRecord", "build_chain"]


class ChainConfigError(StageError):
    """A chain spec is wrong; `problems` holds one "key.path: reason" line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class StageRecord:
    """What one stage did: enough to reproduce it and to record it as provenance."""

    name: str
    version: int
    params: Mapping[str, Any]
    seconds: float
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "version": self.version,
            "params": dict(self.params),
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class ChainResult:
    image: Image
    stages: list[StageRecord]
    masks: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chain:
    stages: tuple[Stage, ...]

    def describe(self) -> list[dict[str, Any]]:
        """The chain's recipe: kinds, versions and options, before anything runs."""
        return [
            {"stage": s.name, "version": s.version, "options": s.options.model_dump(mode="json")}
            for s in self.stages
        ]

    def run(self, image: Image, ctx: StageContext) -> ChainResult:
        records: list[StageRecord] = []
        masks: dict[str, Any] = {}
        for stage in self.stages:
            started = time.perf_counter()
            result = stage.run(image, ctx)
            records.append(
                StageRecord(
                    stage.name,
                    stage.version,
                    result.params,
                    time.perf_counter() - started,
                    result.skipped,
                )
            )
            if result.mask is not None:
                masks[stage.name] = result.mask
            image = result.image
        return ChainResult(image=image, stages=records, masks=masks)


def build_chain(specs: Sequence[Mapping[str, Any]], *, path: str = "pipeline.stages") -> Chain:
    """Turn [{"kind": "upscale", "scale": 2}, ...] into stages, reporting every problem at once
    with its key path, before any image is touched."""
    problems: list[str] = []
    stages: list[Stage] = []
    for index, spec in enumerate(specs):
        where = f"{path}[{index}]"
        options = dict(spec)
        kind = options.pop("kind", None)
        if kind is None:
            problems.append(f"{where}.kind: missing (one of {', '.join(sorted(STAGES))})")
            continue
        if kind not in STAGES:
            problems.append(
                f"{where}.kind: unknown stage {kind!r} (one of {', '.join(sorted(STAGES))})"
            )
            continue
        stage_cls = STAGES[kind]
        try:
            stages.append(stage_cls(stage_cls.Options(**options)))
        except ValidationError as exc:
            problems.extend(_validation_lines(exc, where))
    if not specs:
        problems.append(f"{path}: the chain is empty")
    if problems:
        raise ChainConfigError(problems)
    return Chain(tuple(stages))


def _validation_lines(exc: ValidationError, where: str) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown option"
        if not loc and (named := re.match(r"([a-z_]+): (.*)", message)):
            loc, message = named.groups()
        lines.append(f"{where}.{loc}: {message}" if loc else f"{where}: {message}")
    return lines
