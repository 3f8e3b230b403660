"""What kind of image an output is, in IPTC's words: the DigitalSourceType NewsCode its stages
earn (a trained model made pixels, or only classical steps ran) and the models that made them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALGORITHMICALLY_ENHANCED",
    "COMPOSITE_WITH_TRAINED",
    "NEWSCODES",
    "SOURCE_TYPES",
    "ModelUse",
    "digital_source_type",
    "models_used",
    "source_type_uri",
    "with_licences",
]

NEWSCODES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
COMPOSITE_WITH_TRAINED = NEWSCODES + "compositeWithTrainedAlgorithmicMedia"
ALGORITHMICALLY_ENHANCED = NEWSCODES + "algorithmicallyEnhanced"

# The codes of IPTC's Digital Source Type vocabulary a collection may give as what its scans
# are of ([provenance] source_type); for scans of photographs: print, negativeFilm, positiveFilm.
SOURCE_TYPES = (
    "digitalCapture",
    "computationalCapture",
    "negativeFilm",
    "positiveFilm",
    "print",
    "humanEdits",
    "minorHumanEdits",
    "compositeCapture",
    "algorithmicallyEnhanced",
    "digitalCreation",
    "dataDrivenMedia",
    "trainedAlgorithmicMedia",
    "compositeWithTrainedAlgorithmicMedia",
    "algorithmicMedia",
    "screenCapture",
    "virtualRecording",
    "composite",
    "compositeSynthetic",
)


def source_type_uri(code: str) -> str:
    """The NewsCode URI for `code` (a code such as "print", or its full URI); ValueError names
    the allowed codes."""
    name = code.removeprefix(NEWSCODES)
    if name not in SOURCE_TYPES:
        raise ValueError(f"{code!r} is not an IPTC digital source type (one of {SOURCE_TYPES})")
    return NEWSCODES + name


@dataclass(frozen=True)
class ModelUse:
    """A model file a stage used: its id, SHA-256, whether it made pixels (a restoration
    model, not a detector or a face parser), the stage that ran it and its licence (as
    `with_licences` recorded it, None where not recorded)."""

    stage: str
    id: str
    sha256: str
    made_pixels: bool
    licence: str | None = None


def models_used(stages: Sequence[Mapping[str, Any]]) -> list[ModelUse]:
    """Every model named in the stages' records (StageRecord.as_dict() shapes), skipped stages
    included, each once per stage. A stage names a model as `X` with its hash as `X_sha256`,
    anywhere in its params; `model`, `*_model` are models that made pixels."""
    found: list[ModelUse] = []
    for record in stages:
        seen: set[tuple[str, str]] = set()
        for key, model_id, sha, licence in _hashed_refs(record.get("params") or {}):
            if (model_id, sha) in seen:
                continue
            seen.add((model_id, sha))
            pixels = (key == "model" or key.endswith("_model")) and not record.get("skipped")
            found.append(ModelUse(record["stage"], model_id, sha, pixels, licence))
    return found


def with_licences(
    stages: Sequence[Mapping[str, Any]], licences: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The stage records with each model's licence beside its hash (`X_licence` next to `X`
    and `X_sha256`), from `licences` (model id -> licence; "unknown" where it has none)."""
    return [
        {**record, "params": _licensed(record.get("params") or {}, licences)} for record in stages
    ]


def _licensed(params: Mapping[str, Any], licences: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        out[key] = _licensed(value, licences) if isinstance(value, Mapping) else value
        if key.endswith("_sha256") and isinstance(params.get(key.removesuffix("_sha256")), str):
            name = key.removesuffix("_sha256")
            out[f"{name}_licence"] = licences.get(params[name], "unknown")
    return out


def digital_source_type(stages: Sequence[Mapping[str, Any]]) -> str | None:
    """compositeWithTrainedAlgorithmicMedia when a stage that ran made pixels with a trained
    model (GAN upscale, face restoration, learned denoise or inpainting), algorithmicallyEnhanced
    when only classical steps changed the image, None when no stage changed it. Never
    trainedAlgorithmicMedia: every output is made from a real scan."""
    if any(use.made_pixels for use in models_used(stages)):
        return COMPOSITE_WITH_TRAINED
    if any(not record.get("skipped") for record in stages):
        return ALGORITHMICALLY_ENHANCED
    return None


def _hashed_refs(params: Mapping[str, Any]) -> Iterator[tuple[str, str, str, str | None]]:
    """(key, id, sha256, licence) for each `key` beside a `key_sha256`, nested dicts too."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from _hashed_refs(value)
        elif key.endswith("_sha256") and isinstance(value, str):
            name = key.removesuffix("_sha256")
            if isinstance(params.get(name), str):
                yield name, params[name], value, params.get(f"{name}_licence")
