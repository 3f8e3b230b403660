"""Build a chain of stages from plain specs and run it over an image."""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pipeline.errors import StageError
from pipeline.image import Image
from pipeline.models import ModelStore, TrustedModels
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

    def models(self) -> list[tuple[int, str]]:
        """(stage index, model ref) for every model the chain will load."""
        return [(index, ref) for index, stage in enumerate(self.stages) for ref in stage.models()]

    def check_models(self, store: Any, *, path: str = "pipeline.stages") -> None:
        """Every model the chain needs is in `store`'s cache or fetchable: checked before any
        image, so a missing face model stops the start, not the middle of a batch."""
        problems = [
            f"{path}[{index}] ({self.stages[index].name}): {reason}"
            for index, ref in self.models()
            if (reason := store.unavailable(ref)) is not None
        ]
        if problems:
            raise ChainConfigError(problems)

    def check_licences(
        self,
        models: TrustedModels,
        allowed: Collection[str],
        *,
        path: str = "pipeline.stages",
        key: str = "models.allowed_licences",
    ) -> dict[str, str]:
        """Every model's licence (model id -> licence), refusing the chain, one line per model,
        naming the stage, the model and its licence, where a licence is not in `allowed`. An id
        takes its registry or catalogue licence (nothing is fetched); a path is resolved through
        `models`, which hashes it once, as preparing does anyway."""
        specs = models.store.specs()
        licences: dict[str, str] = {}
        problems: list[str] = []
        for index, ref in self.models():
            spec = specs[ref] if ref in specs else models.resolve(ref).spec
            licences[spec.id] = spec.licence
            if spec.licence not in allowed:
                problems.append(
                    f"{path}[{index}] ({self.stages[index].name}): model {spec.id} has licence "
                    f"{spec.licence!r}, which {key} does not allow ({', '.join(allowed)})"
                )
        if problems:
            raise ChainConfigError(problems)
        return licences

    def prepare_models(self, store: ModelStore) -> TrustedModels:
        """The chain's models, each hashed once now and bound to that hash for every image
        (the policy is `pipeline.models.trust`'s); pass the result as `StageContext.models`."""
        return TrustedModels.prepare(store, [ref for _, ref in self.models()])

    def run(self, image: Image, ctx: StageContext) -> ChainResult:
        records: list[StageRecord] = []
        masks: dict[str, Any] = {}
        stages = list(self.stages)
        while stages:
            stage = stages.pop(0)
            if stage.name == "face" and stages and stages[0].name == "upscale":
                # Faces are restored at the output resolution, as upstream does with a
                # background upsampler: upscale first, then paste the 512px faces (found on
                # the smaller image) into the upscaled one.
                upscale = stages.pop(0)
                upscaled = self._step(upscale, image, ctx, records, masks)
                image = self._step(stage, image, ctx, records, masks, target=upscaled)
            else:
                image = self._step(stage, image, ctx, records, masks)
        return ChainResult(image=image, stages=records, masks=masks)

    @staticmethod
    def _step(
        stage: Stage,
        image: Image,
        ctx: StageContext,
        records: list[StageRecord],
        masks: dict[str, Any],
        **extra: Any,
    ) -> Image:
        if ctx.on_stage is not None:
            ctx.on_stage(stage.name)
        started = time.perf_counter()
        result = stage.run(image, ctx, **extra)
        seconds = time.perf_counter() - started
        records.append(
            StageRecord(stage.name, stage.version, result.params, seconds, result.skipped)
        )
        if result.mask is not None:
            masks[stage.name] = result.mask
        return result.image


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
    problems.extend(_order_problems(specs, path))
    if problems:
        raise ChainConfigError(problems)
    return Chain(tuple(stages))


# Where each kind belongs: clean-up works on the scan's own pixels, faces are generated on the
# cleaned image, and upscaling comes last (everything after it would work on 4-16x the pixels
# and on detail the model invented).
_PLACE = {"denoise": 0, "restore": 0, "face": 1, "upscale": 2}
_WHY = {
    "face": "faces are restored from the cleaned image",
    "upscale": "stages after an upscale would work on many more pixels and on invented detail",
}


def _order_problems(specs: Sequence[Mapping[str, Any]], path: str) -> list[str]:
    """Orders that make no sense: a kind twice, or a kind after one that must follow it."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        kind = spec.get("kind")
        if kind not in _PLACE:
            continue
        if kind in seen:
            problems.append(
                f"{path}[{index}].kind: {kind!r} again (already stage {seen[kind]}); "
                "a kind runs at most once per chain"
            )
            continue
        later = [k for k in seen if _PLACE[k] > _PLACE[kind]]
        if later:
            first = min(later, key=lambda k: seen[k])
            problems.append(
                f"{path}[{index}].kind: {kind!r} after {first!r} (stage {seen[first]}): "
                f"put {kind!r} first; {_WHY[first]}"
            )
        seen[kind] = index
    return problems


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
