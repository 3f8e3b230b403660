"""One way to process an image, for the daemon's workers and `scanrestore process` alike:
decode, run the chain, stamp the provenance into the metadata, and write the output and the mask
of invented pixels as fsynced temporary files beside their final names (see daemon.publish)."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import Config, ConfigError, model_store
from daemon.publish import WrittenFile, remove_written, write_temp
from pipeline.chain import Chain
from pipeline.credentials import SigningKey, UnsignableError
from pipeline.image import Metadata
from pipeline.sourcetype import digital_source_type, models_used, with_licences
from pipeline.stage import StageContext

__all__ = [
    "Failure",
    "OutputSettings",
    "Processed",
    "Stamp",
    "code_version",
    "failure_of",
    "process_image",
    "recipe_of",
    "retry_is_worthwhile",
    "signing_key",
    "stage_line",
    "stamped_metadata",
]

log = logging.getLogger("scanrestore.processing")

# OS errors that say something about the machine, not the image: worth another try later.
_SYSTEM_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC", "EDQUOT", "EFBIG", "EACCES", "EPERM", "EROFS", "EIO", "ENOENT", "ESTALE",
        "ENOTCONN", "ETIMEDOUT", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH",
        "ECONNRESET", "ECONNABORTED", "EAGAIN", "EINTR", "ENOMEM", "EMFILE", "ENFILE", "EBUSY",
        "ENODEV", "ENXIO",
    )
    if hasattr(errno, name)
)  # fmt: skip


def code_version() -> str:
    try:
        return version("scanrestore")
    except PackageNotFoundError:
        return "0+unknown"


def recipe_of(
    config: Config,
    chain: Chain,
    preset: str | None,
    models: Mapping[str, str] | None = None,
    *,
    output_format: str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Everything that shapes an output: the chain's stages with versions and options, the
    sha256 of every model file (`models`, as the chain's prepared models bound them), the
    output format, and the code version (`output_format` and `precision` where the command
    line overrides the config's). Without `models`, each model is resolved here, which also
    proves it is present (or fetches it) before the first image."""
    if models is None:
        from pipeline.models import TrustedModels

        trusted = TrustedModels(model_store(config))
        models = {ref: trusted.resolve(ref).sha256 for _, ref in chain.models()}
    return {
        "stages": chain.describe(),
        "models": dict(models),
        "preset": preset or config.pipeline.preset or None,
        "output": {
            "format": output_format or config.image.output_format,
            "quality": config.image.quality,
        },
        "precision": precision or config.processing.precision,
        "code_version": code_version(),
    }


def retry_is_worthwhile(exc: BaseException) -> bool:
    """Whether another try may succeed, i.e. the failure says nothing against the image: a
    model problem (tampered, missing), or an error of the system (disk full, permission denied,
    a share gone) anywhere in the exception's chain. A decoder's own OSError for damaged data
    ("image file is truncated", a seek to a bogus offset) carries no errno or EINVAL, and a name
    too long for its output stays too long: those are the file's, not worth a retry."""
    from pipeline.errors import ModelError

    if isinstance(exc, ModelError):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in _SYSTEM_ERRNOS:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


@dataclass(frozen=True)
class Failure:
    """Why processing an image failed, as reported: the message (naming the file), the
    exception's type, and whether another try may succeed."""

    message: str
    error_type: str
    retryable: bool
    internal: bool = False  # a bug of ours: the caller logs the traceback


def failure_of(source: Path | str, exc: BaseException) -> Failure:
    """How a failure of `process_image` on `source` is reported. An exception that is none of
    ours, nor an OS or memory error, is an internal error."""
    from pipeline.errors import PipelineError

    kind = type(exc).__name__
    if isinstance(exc, PipelineError):
        return Failure(str(exc), kind, retry_is_worthwhile(exc))
    if isinstance(exc, MemoryError):
        return Failure(f"{source}: out of memory", kind, True)
    if isinstance(exc, OSError):  # disk full, permissions, a share gone: worth another try
        return Failure(f"{source}: {exc}", kind, True)
    return Failure(f"{source}: internal error: {exc!r}", kind, True, internal=True)


@dataclass(frozen=True)
class OutputSettings:
    """How outputs are written: the format ("same" keeps the input's), its quality, the largest
    input accepted, whether the mask of invented pixels is written as a sidecar, and what the
    collection's scans are of (an IPTC digital source type URI, or None)."""

    format: str
    quality: int
    max_pixels: int
    mask: bool = True
    source_type: str | None = None
    signing: SigningKey | None = None  # C2PA content credentials, when configured

    @classmethod
    def from_config(cls, config: Config, *, output_format: str | None = None) -> OutputSettings:
        return cls(
            format=output_format or config.image.output_format,
            quality=config.image.quality,
            max_pixels=config.image.max_pixels,
            mask=config.daemon.mask_sidecar,
            source_type=config.provenance.source_type_uri(),
            signing=signing_key(config),
        )


def signing_key(config: Config) -> SigningKey | None:
    """The configured C2PA certificate chain and key, checked; None when signing is off. A
    pair that cannot sign is a ConfigError naming the keys and the reason."""
    settings = config.provenance
    if not settings.c2pa_cert:
        return None
    from pipeline.credentials import CredentialsError, SigningKey

    try:
        return SigningKey.load(
            Path(settings.c2pa_cert).expanduser(), Path(settings.c2pa_key).expanduser()
        )
    except CredentialsError as exc:
        raise ConfigError([f"provenance.c2pa_cert/c2pa_key: {exc}"]) from exc


@dataclass(frozen=True)
class Stamp:
    """The provenance written into every output: the software, the run's token (XMP RunId)
    and the recipe's hash."""

    software: str
    run_token: str
    recipe_sha256: str


@dataclass(frozen=True)
class Processed:
    """What processing one image made: its files (the image first, then its mask if any) as
    fsynced temporary files, the stages' records, the device used and the format written."""

    files: tuple[WrittenFile, ...]
    stages: list[dict[str, Any]]
    device: str | None
    format: str
    credentials: str | None = None  # "c2pa", or why the image went unsigned; None: signing off


def process_image(
    source: Path,
    dest_dir: Path,
    stem: str,
    *,
    chain: Chain,
    ctx: StageContext,
    output: OutputSettings,
    stamp: Stamp,
) -> Processed:
    """Decode `source`, run `chain`, stamp the result, and write `<stem>`'s image (and mask)
    as temporary files in `dest_dir`. On any failure nothing written is left behind."""
    from pipeline import image as imageio

    image = imageio.decode(source, max_pixels=output.max_pixels)
    dest_dir.mkdir(parents=True, exist_ok=True)
    result = chain.run(image, ctx)
    stages = with_licences([record.as_dict() for record in result.stages], _licences(chain, ctx))
    fmt = image.format if output.format == "same" else output.format
    formats: list[str] = []
    credentials = _credentials_plan(output, fmt)

    def write_image(path: Path) -> None:
        nonlocal credentials
        metadata = stamped_metadata(
            result.image.metadata, stages, stamp, output.source_type, credentials
        )
        stamped = result.image.replace(metadata=metadata)
        if credentials != "c2pa" or output.signing is None:
            formats.append(imageio.encode(stamped, path, format=fmt, quality=output.quality))
            return
        unsigned = path.with_name(path.name + ".unsigned")
        try:
            formats.append(imageio.encode(stamped, unsigned, format=fmt, quality=output.quality))
            _sign(unsigned, path, formats[-1], output.signing, source, image.format, stages, stamp)
        except UnsignableError as exc:  # this file, not its format: published unsigned
            credentials = f"unsigned: {exc}"
            log.warning("%s: published without content credentials: %s", source, exc)
            formats.clear()
            write_image(path)
        finally:
            unsigned.unlink(missing_ok=True)

    files = [write_temp(dest_dir, stem, "image", imageio.suffix_for(fmt), write_image)]
    try:
        mask = _invented(result.masks, result.image.width, result.image.height)
        if output.mask and mask is not None:
            files.append(write_temp(dest_dir, stem, "mask", ".mask.png", _mask_writer(mask)))
    except BaseException:
        remove_written(files)
        raise
    return Processed(tuple(files), stages, ctx.device, formats[0], credentials)


def _credentials_plan(output: OutputSettings, fmt: str) -> str | None:
    """ "c2pa" when the image will be signed, "unsigned: why" when C2PA cannot sign its format,
    None when signing is off."""
    if output.signing is None:
        return None
    from pipeline.credentials import unsignable_reason

    reason = unsignable_reason(fmt)
    if reason is not None:
        log.warning("outputs in %s are published without content credentials: %s", fmt, reason)
        return f"unsigned: {reason}"
    return "c2pa"


def _sign(
    unsigned: Path,
    dest: Path,
    fmt: str,
    key: SigningKey,
    source: Path,
    source_format: str,
    stages: Sequence[Mapping[str, Any]],
    stamp: Stamp,
) -> None:
    """Sign the encoded image into `dest`: the last write before write_temp fsyncs it."""
    from pipeline.credentials import sign

    sign(
        unsigned,
        dest,
        fmt,
        key=key,
        source=source,
        source_format=source_format,
        stages=stages,
        title=dest.name,
        software=stamp.software,
    )


def stamped_metadata(
    metadata: Metadata,
    stages: Sequence[Mapping[str, Any]],
    stamp: Stamp,
    source_type: str | None = None,
    credentials: str | None = None,
) -> Metadata:
    """`metadata` (the chain's result's) with the provenance stamp: Software, RunId, recipe
    hash, one line per stage and per model (hash and licence), and IPTC's DigitalSourceType
    with the AI systems that made pixels (`source_type`: the collection's, recorded as the
    source's where its own XMP states none); `credentials` ("c2pa", or why the file is not
    signed) as ContentCredentials."""
    from pipeline.stamp import Disclosure
    from pipeline.stamp import stamp as stamp_metadata

    used = models_used(stages)
    makers = list({(use.id, use.sha256): use for use in used if use.made_pixels}.values())
    disclosure = Disclosure(
        digital_source_type(stages),
        default_source_type=source_type,
        ai_systems=tuple(use.id for use in makers),
        ai_system_versions=tuple(f"sha256:{use.sha256}" for use in makers),
    )
    models = {
        (use.id, use.sha256): f"{use.id} sha256:{use.sha256} licence:{use.licence or 'unknown'}"
        for use in used
    }
    return stamp_metadata(
        metadata,
        software=stamp.software,
        properties={"RunId": stamp.run_token, "RecipeSHA256": stamp.recipe_sha256}
        | ({"ContentCredentials": credentials} if credentials else {}),
        stages=[stage_line(record) for record in stages],
        models=list(models.values()),
        disclosure=disclosure,
    )


def _licences(chain: Chain, ctx: StageContext) -> dict[str, str]:
    """Model id -> licence for every model the chain may use: the registry's and catalogue's
    entries, and each file the chain names by path ("unknown" unless it is a known model)."""
    models = ctx.models
    store = getattr(models, "store", models)  # TrustedModels wraps a ModelStore
    specs = store.specs()
    licences = {model_id: spec.licence for model_id, spec in specs.items()}
    for _, ref in chain.models():
        if ref not in specs:
            resolved = models.resolve(ref)  # bound already: no file is hashed again
            licences[resolved.id] = resolved.spec.licence
    return licences


def stage_line(record: Mapping[str, Any]) -> str:
    """One stage as the XMP stamp lists it: name, version, model and its hash."""
    params = record["params"]
    model = params.get("model")
    text = f"{record['stage']} v{record['version']}"
    if model:
        text += f" {model} sha256:{params.get('model_sha256')}"
    if record.get("skipped"):
        text += f" (skipped: {record['skipped']})"
    return text


def _invented(masks: dict[str, Any], width: int, height: int) -> np.ndarray | None:
    """One 8-bit mask of every pixel a stage invented, at the output's size (a stage that ran
    before an upscale returned its mask at the smaller size)."""
    import cv2

    combined = None
    for mask in masks.values():
        mask = np.asarray(mask)
        if mask.dtype != np.uint8:
            mask = np.clip(np.rint(mask.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        if mask.shape[:2] != (height, width):
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        combined = mask if combined is None else np.maximum(combined, mask)
    return combined


def _mask_writer(mask: np.ndarray) -> Callable[[Path], object]:
    def write(path: Path) -> None:
        import cv2

        ok, data = cv2.imencode(".png", mask)
        if not ok:
            raise OSError(f"{path}: PNG encoding of the mask failed")
        with open(path, "wb") as handle:
            handle.write(data.tobytes())

    return write
