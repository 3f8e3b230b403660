"""Configuration: TOML validated into frozen typed models; every mistake is reported at once, one
line each, naming the file and the key path."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.chain import Chain, ChainConfigError, build_chain
from pipeline.image import DEFAULT_MAX_PIXELS

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]

DEFAULT_STAGES: tuple[dict[str, Any], ...] = ({"kind": "upscale"},)


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one "file: key.path: reason" per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsConfig(_Section):
    cache_dir: str = ""
    auto_fetch: bool = True


class ProcessingConfig(_Section):
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    seed: int = 0
    threads: int = Field(0, ge=0)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value


class ImageConfig(_Section):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    output_format: Literal["same", "jpeg", "png", "tiff", "webp"] = "same"
    quality: int = Field(95, ge=1, le=100)


class PipelineConfig(_Section):
    stages: tuple[dict[str, Any], ...] = DEFAULT_STAGES


class Config(_Section):
    models: ModelsConfig = ModelsConfig()
    processing: ProcessingConfig = ProcessingConfig()
    image: ImageConfig = ImageConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def chain(self) -> Chain:
        return build_chain(self.pipeline.stages)


def parse_config(data: dict[str, Any], *, source: str = "config.toml") -> Config:
    """Validate a parsed TOML document, including every stage's options."""
    problems: list[str] = []
    config = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = _key_path(error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"{source}: {loc}: {message}")
    stages = data.get("pipeline", {}).get("stages", DEFAULT_STAGES)
    if isinstance(stages, list | tuple):
        try:
            build_chain(stages)
        except ChainConfigError as exc:
            problems.extend(f"{source}: {line}" for line in exc.problems)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def load_config(path: Path | None) -> Config:
    """Read and validate a TOML file; None means the built-in defaults."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse_config(data, source=str(path))


def _key_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
