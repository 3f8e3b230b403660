"""The model spec and the registry mechanism: what is known about a model file before it loads,
and how specs are indexed (the built-in entries themselves live in `registry.py`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

__all__ = ["Loader", "ModelSpec", "Origin", "Purpose", "ResolvedModel", "build_registry"]

Purpose = Literal["upscale", "face", "detect", "parse", "denoise", "inpaint", "defects"]
Loader = Literal["spandrel", "state_dict"]
# "package": weights shipped inside the package (pipeline/models/weights), trained here.
Origin = Literal["official", "custom", "file", "package"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything known about one model file before it is loaded.

    `architecture` is the id spandrel reports (``ESRGAN``, ``Compact``, ``GFPGAN``...) or, for
    weights spandrel cannot build, ``RetinaFace``/``ParseNet`` (facexlib) and ``FFDNet`` (KAIR),
    which load as plain state dicts. `variant` is a construction hint spandrel cannot infer, such
    as facexlib's RetinaFace backbone. `filename` is relative to the cache folder, except for
    `origin="file"` specs, where it is the user's own path.
    """

    id: str
    url: str | None
    sha256: str | None
    bytes: int | None
    architecture: str
    scale: int
    purpose: Purpose
    licence: str
    filename: str
    loader: Loader = "spandrel"
    variant: str | None = None
    origin: Origin = "official"

    def __post_init__(self) -> None:
        problems = []
        if not self.id:
            problems.append("empty id")
        if self.sha256 is not None and not _SHA256_RE.fullmatch(self.sha256):
            problems.append(f"sha256 {self.sha256!r} is not 64 lower-case hex digits")
        if self.scale < 1:
            problems.append(f"scale {self.scale} must be >= 1")
        for name, allowed in (("purpose", Purpose), ("loader", Loader), ("origin", Origin)):
            if getattr(self, name) not in get_args(allowed):
                problems.append(f"{name} {getattr(self, name)!r} is not one of {get_args(allowed)}")
        if problems:
            raise ValueError(f"model spec {self.id!r}: " + "; ".join(problems))


def build_registry(*specs: ModelSpec) -> Mapping[str, ModelSpec]:
    """Index specs by id, refusing duplicate ids, file names or hashes (each would be ambiguous)."""
    registry: dict[str, ModelSpec] = {}
    for field_name in ("id", "filename", "sha256"):
        seen: dict[object, str] = {}
        for spec in specs:
            value = getattr(spec, field_name)
            if value is not None and value in seen:
                raise ValueError(f"duplicate {field_name} {value!r}: {seen[value]} and {spec.id}")
            seen[value] = spec.id
    for spec in specs:
        registry[spec.id] = spec
    return MappingProxyType(registry)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into a file and the hash that file must have."""

    id: str
    spec: ModelSpec
    path: Path
    sha256: str
