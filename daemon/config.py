"""Configuration: TOML validated into frozen typed models; every mistake is reported at once, one
line each, naming the file and the key path."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.image import DEFAULT_MAX_PIXELS
from pipeline.models import ModelStore, default_cache_dir
from pipeline.sourcetype import source_type_uri

if TYPE_CHECKING:
    # The chain (the stages and their neural-network libraries) is imported where a chain is
    # built, so that reading a config costs no torch: the review page's server never builds one.
    from pipeline.chain import Chain

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "load_config",
    "model_store",
    "parse_config",
    "state_dir",
]

DEFAULT_STAGES: tuple[dict[str, Any], ...] = ({"kind": "upscale"},)


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one "file: key.path: reason" per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Permissive licences: a model under any of them may be used, commercially too. "unknown" is a
# file given by path, or imported without --licence: the user's own choice of weights.
PERMISSIVE_LICENCES = (
    "Apache-2.0",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "MIT",
    "ISC",
    "Zlib",
    "CC0-1.0",
    "CC-BY-4.0",
    "Unlicense",
    "unknown",
)


class ModelsConfig(_Section):
    cache_dir: str = ""
    auto_fetch: bool = True
    allowed_licences: tuple[str, ...] = PERMISSIVE_LICENCES


# What [processing].device and a cluster worker's --device accept.
DEVICE_PATTERN = r"auto|cpu|mps|(cuda|vulkan)(:\d+)?"
DEVICE_RULE = "must be auto, cpu, mps, cuda, cuda:N, vulkan or vulkan:N"


class ProcessingConfig(_Section):
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    seed: int = 0
    threads: int = Field(0, ge=0)
    # Inference engine of every model stage without an `engine` of its own.
    engine: Literal["auto", "torch", "ncnn", "openvino"] = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError(DEVICE_RULE)
        return value


class ImageConfig(_Section):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    output_format: Literal["same", "jpeg", "png", "tiff", "webp"] = "same"
    quality: int = Field(95, ge=1, le=100)


class PipelineConfig(_Section):
    # A preset by name (`[presets.NAME]` here or built in) instead of `stages`.
    preset: str = ""
    stages: tuple[dict[str, Any], ...] = DEFAULT_STAGES


# Built-in presets; config.toml ships the same lists (a test keeps them equal) for users to copy
# and edit, and a `[[presets.NAME]]` list in a config file adds or replaces one by name.
PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    # Faithful: gentle grain-keeping denoise, dust/fade repair, no generated faces, 2x, exact fp32.
    "archival": (
        {"kind": "denoise", "method": "nlm", "h": 5.0, "strength": 0.5},
        {"kind": "restore"},
        {"kind": "upscale", "model": "realesrgan-x2plus", "scale": 2.0, "precision": "fp32"},
    ),
    # Family albums: clean-up, restored faces, 4x for printing.
    "family": (
        {"kind": "denoise", "method": "nlm", "h": 8.0, "strength": 0.8},
        {"kind": "restore"},
        {"kind": "face", "model": "gfpgan-1.4", "fidelity": 0.7},
        {"kind": "upscale", "model": "realesrgan-x4plus", "scale": 4.0},
    ),
    # Fidelity first: faces only half generated, the compact model with most grain kept.
    "crisp": (
        {"kind": "restore"},
        {"kind": "face", "model": "gfpgan-1.4", "fidelity": 0.4},
        {"kind": "upscale", "model": "realesr-general-x4v3", "scale": 4.0, "denoise_strength": 0.2},
    ),
    # Detail first: full learned denoise, fully restored faces, the GAN upscaler.
    "creative": (
        {"kind": "denoise", "method": "dncnn", "strength": 1.0},
        {"kind": "restore"},
        {"kind": "face", "model": "gfpgan-1.4", "fidelity": 1.0},
        {"kind": "upscale", "model": "realesrgan-x4plus", "scale": 4.0},
    ),
}


class WatchConfig(_Section):
    input: str = "scans"
    output: str = "restored"
    mode: Literal["auto", "native", "polling"] = "auto"
    stable_seconds: float = Field(5.0, ge=0)
    rescan_seconds: float = Field(900.0, gt=0)
    ignore: tuple[str, ...] = ()


class DaemonConfig(_Section):
    state_dir: str = ""
    workers: int = Field(1, ge=1, le=64)
    lease_seconds: float = Field(120.0, ge=5)
    max_attempts: int = Field(5, ge=1)
    max_worker_deaths: int = Field(3, ge=1)
    stop_timeout: float = Field(60.0, ge=0)
    mask_sidecar: bool = True
    provenance_sidecar: bool = True


class ScheduleConfig(_Section):
    active_hours: str = ""
    fixity_at: str = "03:00"
    backup_at: str = "04:00"
    backups_kept: int = Field(7, ge=1)

    @field_validator("active_hours")
    @classmethod
    def _hours(cls, value: str) -> str:
        from daemon.schedule import ActiveHours

        ActiveHours.parse(value)  # its ValueError names the problem
        return value

    @field_validator("fixity_at", "backup_at")
    @classmethod
    def _time(cls, value: str) -> str:
        if value and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError('must be "HH:MM" (24-hour) or "" for never')
        return value


class ProvenanceConfig(_Section):
    # What the collection's scans are of, as an IPTC digital source type ("print",
    # "negativeFilm", ...): recorded as the source's where a scan's XMP states none.
    source_type: str = ""
    # C2PA signing of outputs: a PEM certificate chain and its private key ("" = off).
    c2pa_cert: str = ""
    c2pa_key: str = ""

    @field_validator("source_type")
    @classmethod
    def _source_type(cls, value: str) -> str:
        if value:
            source_type_uri(value)  # its ValueError names the allowed codes
        return value

    @model_validator(mode="after")
    def _pair(self) -> ProvenanceConfig:
        if bool(self.c2pa_cert) != bool(self.c2pa_key):
            raise ValueError("c2pa_cert and c2pa_key: set both to sign outputs, or neither")
        return self

    def source_type_uri(self) -> str | None:
        return source_type_uri(self.source_type) if self.source_type else None


class WebConfig(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8750, ge=0, le=65535)
    token: str = ""
    preview_cache_mb: int = Field(512, ge=16)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or any(c.isspace() or c in "/?#@" for c in value):
            raise ValueError("must be an address or host name, e.g. 127.0.0.1")
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: str) -> str:
        if value and len(value) < 16:
            raise ValueError("must be at least 16 characters (or empty)")
        return value


class ClusterConfig(_Section):
    """Several machines (daemon.cluster): the coordinator's broker and a worker's view of the
    shared folders. `broker = ""` keeps local worker processes."""

    broker: str = ""
    path_map: dict[str, str] = {}
    name: str = ""
    heartbeat_seconds: float = Field(5.0, gt=0)
    worker_timeout: float = Field(60.0, gt=0)
    pickup_seconds: float = Field(120.0, gt=0)
    visibility_timeout: float = Field(3600.0, gt=0)
    prefix: str = Field("scanrestore", pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        if value and not re.match(r"(redis|rediss|unix)://", value):
            raise ValueError('must be "" (local workers) or a Redis URL, e.g. redis://HOST:6379/0')
        return value

    @field_validator("path_map")
    @classmethod
    def _path_map(cls, value: dict[str, str]) -> dict[str, str]:
        for source, target in value.items():
            if not (source.startswith("/") and target.startswith("/")):
                raise ValueError(f"{source!r} -> {target!r}: both prefixes must be absolute paths")
        return value


class Config(_Section):
    models: ModelsConfig = ModelsConfig()
    processing: ProcessingConfig = ProcessingConfig()
    image: ImageConfig = ImageConfig()
    pipeline: PipelineConfig = PipelineConfig()
    watch: WatchConfig = WatchConfig()
    daemon: DaemonConfig = DaemonConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    provenance: ProvenanceConfig = ProvenanceConfig()
    web: WebConfig = WebConfig()
    cluster: ClusterConfig = ClusterConfig()
    presets: dict[str, tuple[dict[str, Any], ...]] = {}

    def presets_all(self) -> dict[str, tuple[dict[str, Any], ...]]:
        """Built-in presets, then this file's (which win by name)."""
        return {**PRESETS, **self.presets}

    def stages(self, preset: str | None = None) -> list[dict[str, Any]]:
        """The stage specs to run: `preset` if given, else pipeline.preset, else stages."""
        name = preset or self.pipeline.preset
        if not name:
            return [dict(spec) for spec in self.pipeline.stages]
        known = self.presets_all()
        if name not in known:
            where = "--preset" if preset else "pipeline.preset"
            from pipeline.chain import ChainConfigError

            raise ChainConfigError([f"{where}: unknown preset {name!r} (one of {_names(known)})"])
        return [dict(spec) for spec in known[name]]

    def chain(self, preset: str | None = None) -> Chain:
        where = (
            f"presets.{preset or self.pipeline.preset}" if preset or self.pipeline.preset else None
        )
        from pipeline.chain import build_chain

        return build_chain(self.stages(preset), path=where or "pipeline.stages")


def parse_config(data: dict[str, Any], *, source: str = "config.toml") -> Config:
    """Validate a parsed TOML document, including every stage's options."""
    from pipeline.chain import ChainConfigError, build_chain

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
    pipeline = data.get("pipeline", {})
    chains = {"pipeline.stages": pipeline.get("stages", DEFAULT_STAGES)}
    presets = data.get("presets", {})
    if isinstance(presets, dict):
        chains |= {f"presets.{name}": stages for name, stages in presets.items()}
    for where, stages in chains.items():
        if isinstance(stages, list | tuple):
            try:
                build_chain(stages, path=where)
            except ChainConfigError as exc:
                problems.extend(f"{source}: {line}" for line in exc.problems)
    preset = pipeline.get("preset") if isinstance(pipeline, dict) else None
    if preset:
        known = {**PRESETS, **(presets if isinstance(presets, dict) else {})}
        if preset not in known:
            problems.append(
                f"{source}: pipeline.preset: unknown preset {preset!r} (one of {_names(known)})"
            )
        if "stages" in pipeline:
            problems.append(f"{source}: pipeline.preset: set either preset or stages, not both")
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


def state_dir(config: Config) -> Path:
    """Where the database lives: the config's, else systemd's $STATE_DIRECTORY, else XDG."""
    if config.daemon.state_dir:
        return Path(config.daemon.state_dir).expanduser()
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "scanrestore"


def worker_threads(config: Config) -> int:
    """Each local worker's inference threads: [processing].threads, or where that is 0 and
    there are several workers, the usable cores shared evenly among them (each engine would
    otherwise start a thread per core in every worker). 0 leaves it to the engines."""
    workers, threads = config.daemon.workers, config.processing.threads
    if threads or workers == 1:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def model_store(config: Config) -> ModelStore:
    """The model cache the config names (or the default one)."""
    cache = config.models.cache_dir
    directory = Path(cache).expanduser() if cache else default_cache_dir()
    return ModelStore(directory, auto_fetch=config.models.auto_fetch)


def _names(presets: dict[str, Any]) -> str:
    return ", ".join(sorted(presets))


def _key_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
