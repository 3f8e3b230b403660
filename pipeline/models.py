"""Model registry and store: which weights scanrestore knows, where they live, how they load.

Official weights are fetched from pinned URLs and checked against pinned SHA-256 hashes; any other
file is imported as a custom model whose hash and detected architecture are recorded in the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Literal, get_args

from pipeline.errors import (
    ArchitectureMismatchError,
    DownloadError,
    HashMismatchError,
    ModelError,
    ModelNotAvailableError,
    UnknownModelError,
)
from pipeline.files import replace_durably, sha256_file, temp_beside, write_atomically

if TYPE_CHECKING:
    import torch
    from spandrel import ImageModelDescriptor

__all__ = [
    "REGISTRY",
    "LoadedModel",
    "Loader",
    "ModelSpec",
    "ModelStore",
    "Origin",
    "Purpose",
    "ResolvedModel",
    "VerifyResult",
    "VerifyStatus",
    "build_registry",
    "default_cache_dir",
]

_log = logging.getLogger(__name__)

Purpose = Literal["upscale", "face", "detect", "parse", "denoise", "inpaint"]
Loader = Literal["spandrel", "state_dict"]
Origin = Literal["official", "custom", "file"]
VerifyStatus = Literal["ok", "mismatch", "missing", "unpinned"]

_CHUNK = 1 << 20
_USER_AGENT = "scanrestore (model store)"
_CATALOGUE_NAME = "models.json"
_CATALOGUE_FORMAT = 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Custom ids become file names and CLI arguments: keep them to a safe, shell-friendly alphabet.
_CUSTOM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,79}")
# The wrappers upstream training code saves around the weights, in the order upstream prefers them
# (Real-ESRGAN and GFPGAN take the EMA weights when both are present).
_WRAPPER_KEYS = ("params_ema", "params", "state_dict")
_SPANDREL_PURPOSES: Mapping[str, Purpose] = {
    "SR": "upscale",
    "FaceSR": "face",
    "Restoration": "denoise",
    "Inpainting": "inpaint",
}


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


_REAL_ESRGAN = "https://github.com/xinntao/Real-ESRGAN/releases/download"
_GFPGAN = "https://github.com/TencentARC/GFPGAN/releases/download"
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"
_KAIR = "https://github.com/cszn/KAIR/releases/download"

# Hashes are the values independent packagers pinned for the upstream release files (upstream
# publishes none). RestoreFormer has no agreed hash anywhere: it is pinned on first fetch/import.
REGISTRY: Mapping[str, ModelSpec] = build_registry(
    ModelSpec(
        id="realesrgan-x4plus",
        url=f"{_REAL_ESRGAN}/v0.1.0/RealESRGAN_x4plus.pth",
        sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
        bytes=67040989,
        architecture="ESRGAN",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="RealESRGAN_x4plus.pth",
    ),
    ModelSpec(
        id="realesrgan-x2plus",
        url=f"{_REAL_ESRGAN}/v0.2.1/RealESRGAN_x2plus.pth",
        sha256="49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
        bytes=67061725,
        architecture="ESRGAN",
        scale=2,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="RealESRGAN_x2plus.pth",
    ),
    ModelSpec(
        id="realesr-general-x4v3",
        url=f"{_REAL_ESRGAN}/v0.2.5.0/realesr-general-x4v3.pth",
        sha256="8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292",
        bytes=4885111,
        architecture="Compact",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="realesr-general-x4v3.pth",
    ),
    ModelSpec(
        id="realesr-general-wdn-x4v3",
        url=f"{_REAL_ESRGAN}/v0.2.5.0/realesr-general-wdn-x4v3.pth",
        sha256="1641f8c4464b9f097c9fdda5589273713f67cf59f3d909e0bd688f0cee269dca",
        bytes=4885111,
        architecture="Compact",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="realesr-general-wdn-x4v3.pth",
    ),
    ModelSpec(
        id="realesrgan-x4plus-anime-6b",
        url=f"{_REAL_ESRGAN}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
        sha256="f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
        bytes=17938799,
        architecture="ESRGAN",
        scale=4,
        purpose="upscale",
        licence="BSD-3-Clause",
        filename="RealESRGAN_x4plus_anime_6B.pth",
    ),
    ModelSpec(
        id="gfpgan-1.4",
        url=f"{_GFPGAN}/v1.3.0/GFPGANv1.4.pth",
        sha256="e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
        bytes=348632874,
        architecture="GFPGAN",
        scale=1,
        purpose="face",
        licence="Apache-2.0",
        filename="GFPGANv1.4.pth",
    ),
    ModelSpec(
        id="gfpgan-1.3",
        url=f"{_GFPGAN}/v1.3.0/GFPGANv1.3.pth",
        sha256="c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70",
        bytes=None,
        architecture="GFPGAN",
        scale=1,
        purpose="face",
        licence="Apache-2.0",
        filename="GFPGANv1.3.pth",
    ),
    ModelSpec(
        id="restoreformer",
        url=f"{_GFPGAN}/v1.3.4/RestoreFormer.pth",
        sha256=None,
        bytes=None,
        architecture="RestoreFormer",
        scale=1,
        purpose="face",
        # Shipped as a GFPGAN (Apache-2.0) release asset; the RestoreFormer repository states none.
        licence="unspecified",
        filename="RestoreFormer.pth",
    ),
    ModelSpec(
        id="retinaface-resnet50",
        url=f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth",
        sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
        bytes=109497761,
        architecture="RetinaFace",
        scale=1,
        purpose="detect",
        licence="MIT",
        filename="detection_Resnet50_Final.pth",
        loader="state_dict",
        variant="resnet50",
    ),
    ModelSpec(
        id="retinaface-mobilenet0.25",
        url=f"{_FACEXLIB}/v0.1.0/detection_mobilenet0.25_Final.pth",
        sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
        bytes=1789735,
        architecture="RetinaFace",
        scale=1,
        purpose="detect",
        licence="MIT",
        filename="detection_mobilenet0.25_Final.pth",
        loader="state_dict",
        variant="mobile0.25",
    ),
    ModelSpec(
        id="parsenet",
        url=f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth",
        sha256="3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
        bytes=85331193,
        architecture="ParseNet",
        scale=1,
        purpose="parse",
        licence="MIT",
        filename="parsing_parsenet.pth",
        loader="state_dict",
    ),
    ModelSpec(
        id="dncnn-color-blind",
        url=f"{_KAIR}/v1.0/dncnn_color_blind.pth",
        sha256="dfe11a6b703304df82cdf236f431fc6492766c7b9119d97e943edeb392c710a3",
        bytes=2678121,
        architecture="DnCNN",
        scale=1,
        purpose="denoise",
        licence="MIT",
        filename="dncnn_color_blind.pth",
    ),
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into a file and the hash that file must have."""

    id: str
    spec: ModelSpec
    path: Path
    sha256: str


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """Weights in memory, in eval mode with gradients off.

    Shared by every stage that asks for the same file on the same device and dtype: never call
    `.to()`, `.half()` or `.train()` on it; ask `ModelStore.load` for the variant you need.
    `descriptor` is spandrel's descriptor (scale, tiling, size requirements, precision support);
    it is None for facexlib models, which are plain `torch.nn.Module`s.
    """

    id: str
    sha256: str
    path: Path
    spec: ModelSpec
    module: torch.nn.Module
    descriptor: ImageModelDescriptor[Any] | None
    device: str
    dtype: str


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-hashing one cached file."""

    spec: ModelSpec
    path: Path
    status: VerifyStatus
    actual_sha256: str | None

    @property
    def expected_sha256(self) -> str | None:
        return self.spec.sha256


def default_cache_dir() -> Path:
    """$SCANRESTORE_CACHE_DIR, else $XDG_CACHE_HOME/scanrestore/models, else ~/.cache/..."""
    explicit = os.environ.get("SCANRESTORE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "scanrestore" / "models"


# --- files -----------------------------------------------------------------------------------


def _hash_stream(
    source: IO[bytes] | http.client.HTTPResponse,
    sink: IO[bytes] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    total: int | None = None,
) -> tuple[str, int]:
    """Read `source` to its end, hashing (and optionally copying) it; return (sha256, bytes)."""
    digest = hashlib.sha256()
    done = 0
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return digest.hexdigest(), done


def _is_safetensors(head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    return len(head) >= 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _deserialize(handle: IO[bytes], what: str) -> dict[str, Any]:
    """Read weights without executing code: safetensors, or torch's weights-only unpickler.

    spandrel's `load_from_file` is avoided on purpose: it hands `.pt` files to `torch.jit.load`.
    """
    import torch

    head = handle.read(16)
    handle.seek(0)
    try:
        if _is_safetensors(head):
            from safetensors.torch import load as load_safetensors

            data: object = load_safetensors(handle.read())
        else:
            data = torch.load(handle, map_location="cpu", weights_only=True)
    # The bytes are untrusted input: whatever the unpickler or parser throws means "not weights".
    except Exception as exc:
        raise ModelError(f"{what}: not a loadable weights file: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{what}: holds a {type(data).__name__}, not a state dict")
    return data


def _read_verified(path: Path, expected: str | None, what: str) -> tuple[dict[str, Any], str]:
    """Hash then deserialize through one open file, so the bytes checked are the bytes loaded."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError as exc:
        raise ModelNotAvailableError(f"{what}: {path} does not exist") from exc
    with handle:
        actual, _ = _hash_stream(handle)
        if expected is not None and actual != expected:
            raise HashMismatchError(f"{what} ({path})", expected, actual)
        handle.seek(0)
        return _deserialize(handle, f"{what} ({path})"), actual


def _unwrap(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights inside upstream's wrappers: EMA weights first, DataParallel's `module.` off."""
    for key in _WRAPPER_KEYS:
        inner = data.get(key)
        if isinstance(inner, Mapping):
            data = inner
            break
    if data and all(isinstance(key, str) and key.startswith("module.") for key in data):
        data = {key.removeprefix("module."): value for key, value in data.items()}
    return data


def _unwrap_state_dict(data: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    """`_unwrap`, insisting that what is left is tensors and nothing else."""
    import torch

    unwrapped = _unwrap(data)
    for key, value in unwrapped.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{what}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(unwrapped)


# --- architectures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Detected:
    architecture: str
    scale: int
    purpose: Purpose
    loader: Loader
    variant: str | None = None


_RETINAFACE_HEADS = (
    "ClassHead.0.conv1x1.weight",
    "BboxHead.0.conv1x1.weight",
    "LandmarkHead.0.conv1x1.weight",
)
_RETINAFACE_BACKBONES = {"body.stage1.0.0.weight": "mobile0.25", "body.conv1.weight": "resnet50"}
_PARSENET_KEYS = (
    "encoder.0.conv2d.weight",
    "out_img_conv.conv2d.weight",
    "out_mask_conv.conv2d.weight",
)


def _detect_facexlib(state_dict: Mapping[str, Any]) -> _Detected | None:
    if all(key in state_dict for key in _RETINAFACE_HEADS):
        for key, variant in _RETINAFACE_BACKBONES.items():
            if key in state_dict:
                return _Detected("RetinaFace", 1, "detect", "state_dict", variant)
    if all(key in state_dict for key in _PARSENET_KEYS):
        return _Detected("ParseNet", 1, "parse", "state_dict")
    return None


def _detect_ffdnet(state_dict: Mapping[str, Any]) -> _Detected | None:
    """KAIR's FFDNet, which spandrel mistakes for a 12-channel FDnCNN.

    FFDNet works on 2x2 pixel-unshuffled input plus a noise-level map: its first conv takes
    4*C + 1 channels and its last gives 4*C, C being 1 (grey) or 3 (colour).
    """
    weights = [key for key in state_dict if re.fullmatch(r"model\.\d+\.weight", key)]
    if not weights or any("running_mean" in key for key in state_dict):
        return None
    ordered = sorted(weights, key=lambda key: int(key.split(".")[1]))
    first, last = state_dict[ordered[0]], state_dict[ordered[-1]]
    if getattr(first, "ndim", None) != 4 or getattr(last, "ndim", None) != 4:
        return None
    channels = {4: "gray", 12: "color"}.get(last.shape[0])
    if channels is None or first.shape[1] != last.shape[0] + 1:
        return None
    return _Detected("FFDNet", 1, "denoise", "state_dict", channels)


def _build_retinaface(
    variant: str | None, state_dict: Mapping[str, Any], device: torch.device
) -> torch.nn.Module:
    from facexlib.detection.retinaface import RetinaFace

    if variant not in ("resnet50", "mobile0.25"):
        raise ModelError(
            f"RetinaFace needs a backbone variant (resnet50 or mobile0.25), got {variant!r}"
        )
    with warnings.catch_warnings():
        # facexlib still passes torchvision's deprecated `pretrained=False`; nothing is downloaded.
        warnings.simplefilter("ignore", UserWarning)
        network = RetinaFace(network_name=variant, half=False, device=device)
    network.load_state_dict(state_dict, strict=True)
    return network


def _build_parsenet(
    variant: str | None, state_dict: Mapping[str, Any], device: torch.device
) -> torch.nn.Module:
    from facexlib.parsing.parsenet import ParseNet

    # The only configuration facexlib ships weights for (see facexlib.parsing.init_parsing_model).
    network = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    network.load_state_dict(state_dict, strict=True)
    return network.to(device)


_StateDictBuilder = Callable[[str | None, Mapping[str, Any], "torch.device"], "torch.nn.Module"]
_STATE_DICT_BUILDERS: Mapping[str, _StateDictBuilder] = {
    "RetinaFace": _build_retinaface,
    "ParseNet": _build_parsenet,
}


def _build_from_state_dict(
    architecture: str,
    variant: str | None,
    state_dict: Mapping[str, Any],
    device: torch.device,
    what: str,
) -> torch.nn.Module:
    builder = _STATE_DICT_BUILDERS.get(architecture)
    if builder is None:
        raise ModelError(
            f"{what}: no in-process builder for {architecture}; "
            "use ModelStore.load_state_dict() and build the network yourself"
        )
    unwrapped = _unwrap_state_dict(state_dict, what)
    try:
        return builder(variant, unwrapped, device)
    except RuntimeError as exc:  # load_state_dict(strict=True): missing, unexpected or misshapen
        raise ArchitectureMismatchError(
            f"{what}: weights do not fit {architecture} ({variant or 'default'}): {exc}"
        ) from exc


def _spandrel_descriptor(
    state_dict: dict[str, Any], device: torch.device, what: str
) -> ImageModelDescriptor[Any]:
    import spandrel

    try:
        descriptor = spandrel.ModelLoader(device).load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError as exc:
        raise ArchitectureMismatchError(
            f"{what}: spandrel recognises no architecture in these weights, and they are not "
            "a facexlib RetinaFace/ParseNet or KAIR FFDNet state dict"
        ) from exc
    # A detected architecture whose loader then chokes: the detection was a false positive.
    except (RuntimeError, KeyError, ValueError, IndexError, AssertionError) as exc:
        raise ArchitectureMismatchError(
            f"{what}: spandrel could not build the model: {exc}"
        ) from exc
    # Inpainting models (LaMa) take an image and a mask: the restore stage calls them.
    if not isinstance(
        descriptor, (spandrel.ImageModelDescriptor, spandrel.MaskedImageModelDescriptor)
    ):
        raise ArchitectureMismatchError(
            f"{what}: {descriptor.architecture.id} is a {descriptor.purpose} model; "
            "scanrestore only runs image-to-image and inpainting models"
        )
    return descriptor


def _detect(state_dict: dict[str, Any], what: str) -> _Detected:
    """Work out what a file holds, building it once on the CPU to be sure it really loads."""
    import torch

    cpu = torch.device("cpu")
    unwrapped = _unwrap(state_dict)
    # Checked before spandrel, which would accept FFDNet as a (wrong) DnCNN.
    found = _detect_facexlib(unwrapped) or _detect_ffdnet(unwrapped)
    if found is not None:
        if found.architecture in _STATE_DICT_BUILDERS:
            _build_from_state_dict(found.architecture, found.variant, unwrapped, cpu, what)
        return found
    descriptor = _spandrel_descriptor(state_dict, cpu, what)
    return _Detected(
        architecture=str(descriptor.architecture.id),
        scale=descriptor.scale,
        purpose=_SPANDREL_PURPOSES.get(descriptor.purpose, "denoise"),
        loader="spandrel",
    )


def _check_descriptor(spec: ModelSpec, descriptor: ImageModelDescriptor[Any], what: str) -> None:
    actual = (str(descriptor.architecture.id), descriptor.scale)
    if actual != (spec.architecture, spec.scale):
        raise ArchitectureMismatchError(
            f"{what}: expected {spec.architecture} x{spec.scale}, "
            f"but the weights are {actual[0]} x{actual[1]}"
        )


# --- the catalogue of custom models and pinned hashes ----------------------------------------


class _Catalogue:
    """A small JSON file in the cache, rewritten atomically under an exclusive lock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": _CATALOGUE_FORMAT, "custom": {}, "pinned": {}}
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.path}: unreadable model catalogue: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != _CATALOGUE_FORMAT:
            raise ModelError(f"{self.path}: not a format-{_CATALOGUE_FORMAT} model catalogue")
        for section in ("custom", "pinned"):
            if not isinstance(data.setdefault(section, {}), dict):
                raise ModelError(f"{self.path}: {section!r} must be an object")
        return data

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Read, let the caller change, write back if changed; other processes wait meanwhile."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                text = json.dumps(data, indent=2, sort_keys=True) + "\n"
                write_atomically(self.path, text.encode("utf-8"))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _custom_record(spec: ModelSpec, source: Path) -> dict[str, Any]:
    record = dataclasses.asdict(spec)
    for derived in ("id", "url", "origin"):
        del record[derived]
    record["imported_at"] = _now()
    record["source_name"] = source.name
    return record


def _spec_from_record(model_id: str, record: Mapping[str, Any], catalogue: Path) -> ModelSpec:
    try:
        return ModelSpec(
            id=model_id,
            url=None,
            sha256=record["sha256"],
            bytes=record["bytes"],
            architecture=record["architecture"],
            scale=int(record["scale"]),
            purpose=record["purpose"],
            licence=record["licence"],
            filename=record["filename"],
            loader=record["loader"],
            variant=record.get("variant"),
            origin="custom",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{catalogue}: custom model {model_id!r}: bad record: {exc}") from exc


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _official_to_pin(
    source: Path, sha: str, model_id: str | None, specs: Mapping[str, ModelSpec]
) -> ModelSpec | None:
    """Check `model_id` may name a new file: a fresh custom id, or an official one with no hash.

    Returns the official spec whose hash this file will pin, or None for a new custom model.
    """
    if model_id is None:
        raise ModelError(
            f"{source}: sha256 {sha} matches no known model; give an id to import it as custom"
        )
    existing = specs.get(model_id)
    if existing is None:
        if not _CUSTOM_ID_RE.fullmatch(model_id):
            raise ModelError(
                f"{model_id!r}: custom ids are 1-80 letters, digits, '.', '_', '+' or '-', "
                "starting with a letter or digit"
            )
        return None
    if existing.sha256 is None:
        return existing
    if existing.origin == "official":
        raise HashMismatchError(f"{source} as official model {model_id}", existing.sha256, sha)
    raise ModelError(
        f"custom model id {model_id!r} already names another file (sha256 "
        f"{existing.sha256}); choose another id or remove that model first"
    )


# --- the store -------------------------------------------------------------------------------


class ModelStore:
    """Fetches, imports, verifies, resolves and loads model weights kept in one cache folder.

    The constructor does no I/O. Custom models and pinned hashes live in `models.json` in the
    cache folder and are re-read on every call, so a running daemon sees a CLI import at once.
    """

    def __init__(
        self,
        cache_dir: Path,
        registry: Mapping[str, ModelSpec] = REGISTRY,
        *,
        urlopen: Callable[..., Any] = urllib.request.urlopen,
        timeout: float = 60.0,
        auto_fetch: bool = False,
    ) -> None:
        for key, spec in registry.items():
            if key != spec.id or spec.origin != "official":
                raise ValueError(f"registry entry {key!r} must be an official spec with that id")
        self.cache_dir = Path(cache_dir)
        self.registry = registry
        self._urlopen = urlopen
        self._timeout = timeout
        self.auto_fetch = auto_fetch  # fetch a missing official model on first resolve
        self._catalogue = _Catalogue(self.cache_dir / _CATALOGUE_NAME)
        self._loaded: dict[tuple[str, str, str], LoadedModel] = {}
        self._load_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._detected: dict[str, _Detected] = {}  # file refs, by sha256

    # --- lookup

    def specs(self) -> dict[str, ModelSpec]:
        """Every known model by id: the registry (pinned hashes filled in), then custom ones."""
        return self._specs_from(self._catalogue.read())

    def spec(self, model_id: str) -> ModelSpec:
        specs = self.specs()
        try:
            return specs[model_id]
        except KeyError:
            raise UnknownModelError(
                f"{model_id!r} is not a known model id (known: {', '.join(specs)})"
            ) from None

    def path_for(self, spec: ModelSpec) -> Path:
        """Where the spec's file lives (or would live) in the cache."""
        return Path(spec.filename) if spec.origin == "file" else self.cache_dir / spec.filename

    def _specs_from(self, catalogue: Mapping[str, Any]) -> dict[str, ModelSpec]:
        specs: dict[str, ModelSpec] = {}
        for spec in self.registry.values():
            pin = catalogue["pinned"].get(spec.id)
            if spec.sha256 is None and pin is not None:
                spec = dataclasses.replace(spec, sha256=pin["sha256"], bytes=pin["bytes"])
            specs[spec.id] = spec
        for model_id in sorted(catalogue["custom"]):
            if model_id not in specs:  # an official id always wins over a stale record
                specs[model_id] = _spec_from_record(
                    model_id, catalogue["custom"][model_id], self._catalogue.path
                )
        return specs

    # --- resolve

    def resolve(self, ref: str | os.PathLike[str]) -> ResolvedModel:
        """Turn a model id, or a path to a weights file, into a file and its expected hash."""
        text = os.fspath(ref)
        specs = self.specs()
        if text in specs:
            return self._resolve_spec(specs[text])
        candidate = Path(text).expanduser()
        if candidate.is_file():
            return self._resolve_file(candidate, specs)
        raise UnknownModelError(
            f"{text!r} is neither a known model id nor a file (known ids: {', '.join(specs)})"
        )

    def unavailable(self, ref: str | os.PathLike[str]) -> str | None:
        """Why `ref` could not be loaded now, or None; cheap (no hashing, no download), so a
        whole chain's weights can be checked before a batch starts."""
        text = os.fspath(ref)
        specs = self.specs()
        hint = "`scanrestore models fetch ID` or `scanrestore models import FILE`"
        if text in specs:
            spec = specs[text]
            if self.path_for(spec).is_file():
                return None if spec.sha256 else f"{text}: no sha256 pinned yet; use {hint}"
            if self.auto_fetch and spec.url is not None and spec.sha256 is not None:
                return None  # fetched, hash-checked, on first use
            return f"{text}: weights are not in the cache ({self.path_for(spec)}); use {hint}"
        if Path(text).expanduser().is_file():
            return None
        return f"{text!r} is neither a known model id nor a file"

    def _resolve_spec(self, spec: ModelSpec) -> ResolvedModel:
        path = self.path_for(spec)
        hint = f"run `scanrestore models fetch {spec.id}` or `scanrestore models import FILE`"
        if spec.sha256 is None:
            raise ModelNotAvailableError(
                f"{spec.id}: no sha256 is published or pinned for it yet; {hint} to pin one"
            )
        if not path.is_file() and self.auto_fetch and spec.url is not None:
            _log.info("%s: not in the cache, fetching %s", spec.id, spec.url)
            self.fetch(spec.id)
        if not path.is_file():
            raise ModelNotAvailableError(
                f"{spec.id}: weights are not in the cache ({path}); {hint}"
            )
        return ResolvedModel(spec.id, spec, path, spec.sha256)

    def _resolve_file(self, path: Path, specs: Mapping[str, ModelSpec]) -> ResolvedModel:
        path = path.resolve()
        sha = sha256_file(path)
        for spec in specs.values():
            if spec.sha256 == sha:  # a copy of a known model keeps that model's id and licence
                return ResolvedModel(spec.id, spec, path, sha)
        detected = self._detected.get(sha)
        if detected is None:
            state_dict, actual = _read_verified(path, sha, str(path))
            detected = _detect(state_dict, str(path))
            self._detected[actual] = detected
        spec = ModelSpec(
            id=f"file:{path.name}",
            url=None,
            sha256=sha,
            bytes=path.stat().st_size,
            architecture=detected.architecture,
            scale=detected.scale,
            purpose=detected.purpose,
            licence="unknown",
            filename=str(path),
            loader=detected.loader,
            variant=detected.variant,
            origin="file",
        )
        return ResolvedModel(spec.id, spec, path, sha)

    # --- fetch

    def fetch(
        self, model_id: str, *, progress: Callable[[int, int | None], None] | None = None
    ) -> Path:
        """Download an official model into the cache unless a valid copy is already there.

        The transfer goes to a temporary file that is hashed on the fly and only renamed into
        place once complete and correct; on any failure nothing is left behind.
        """
        spec = self.spec(model_id)
        if spec.url is None:
            raise ModelError(
                f"{model_id}: custom models have no download URL; "
                "re-import the file with `scanrestore models import FILE`"
            )
        final = self.path_for(spec)
        if spec.sha256 is not None and final.is_file():
            actual = sha256_file(final)
            if actual == spec.sha256:
                return final
            _log.warning(
                "%s: cached %s has sha256 %s, expected %s; downloading it again",
                model_id,
                final,
                actual,
                spec.sha256,
            )
        sha, size = self._download(spec, final, progress)
        if spec.sha256 is None:
            with self._catalogue.transaction() as catalogue:
                self._pin(catalogue, spec.id, sha, size)
        return final

    def _download(
        self, spec: ModelSpec, final: Path, progress: Callable[[int, int | None], None] | None
    ) -> tuple[str, int]:
        assert spec.url is not None
        request = urllib.request.Request(spec.url, headers={"User-Agent": _USER_AGENT})
        with temp_beside(final) as (temp, handle):
            try:
                with self._urlopen(request, timeout=self._timeout) as response:
                    announced = _content_length(response)
                    total = announced if announced is not None else spec.bytes
                    sha, size = _hash_stream(response, handle, progress, total)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                raise DownloadError(
                    f"{spec.id}: download from {spec.url} failed: {_describe_failure(exc)}"
                ) from exc
            # urllib does not notice a body shorter than its Content-Length: count ourselves.
            for expected_size in (announced, spec.bytes):
                if expected_size is not None and size != expected_size:
                    raise DownloadError(
                        f"{spec.id}: transfer from {spec.url} cut short or oversized: "
                        f"got {size} bytes, expected {expected_size}"
                    )
            if spec.sha256 is not None and sha != spec.sha256:
                raise HashMismatchError(f"{spec.id} (downloaded from {spec.url})", spec.sha256, sha)
            replace_durably(handle, temp, final)
        return sha, size

    def _pin(self, catalogue: dict[str, Any], model_id: str, sha: str, size: int) -> None:
        _log.info("%s: no published sha256; pinning %s", model_id, sha)
        catalogue["pinned"][model_id] = {"sha256": sha, "bytes": size, "pinned_at": _now()}

    # --- import

    def import_file(
        self,
        path: str | os.PathLike[str],
        *,
        model_id: str | None = None,
        licence: str | None = None,
    ) -> ModelSpec:
        """Copy a weights file into the cache and return the spec it is now known by.

        A file whose hash is a registry entry's is stored as that entry whatever `model_id` says.
        Any other file becomes custom model `model_id` (required then) with its architecture and
        scale detected by actually building it; `licence` is recorded for provenance.
        """
        source = Path(path).expanduser()
        if not source.is_file():
            raise ModelError(f"{source}: no such file to import")
        with temp_beside(self.cache_dir / "import") as (temp, handle):
            with open(source, "rb") as reader:
                sha, size = _hash_stream(reader, handle)
            handle.flush()
            with self._catalogue.transaction() as catalogue:
                specs = self._specs_from(catalogue)
                known = next((s for s in specs.values() if s.sha256 == sha), None)
                if known is not None:
                    if model_id not in (None, known.id):
                        _log.info("%s is %s already; not naming it %s", source, known.id, model_id)
                    replace_durably(handle, temp, self.path_for(known))
                    return known
                spec = self._new_spec(temp, source, sha, size, model_id, licence, specs)
                replace_durably(handle, temp, self.path_for(spec))
                if spec.origin == "official":
                    self._pin(catalogue, spec.id, sha, size)
                else:
                    catalogue["custom"][spec.id] = _custom_record(spec, source)
                return spec

    def _new_spec(
        self,
        staged: Path,
        source: Path,
        sha: str,
        size: int,
        model_id: str | None,
        licence: str | None,
        specs: Mapping[str, ModelSpec],
    ) -> ModelSpec:
        """The spec for a file matching no known hash, or an error saying why it cannot be one."""
        unpinned = _official_to_pin(source, sha, model_id, specs)
        assert model_id is not None  # _official_to_pin refuses a missing id
        what = f"{source} (importing as {model_id})"
        with open(staged, "rb") as reader:
            detected = _detect(_deserialize(reader, what), what)
            reader.seek(0)
            suffix = ".safetensors" if _is_safetensors(reader.read(16)) else ".pth"
        if unpinned is not None:
            if (detected.architecture, detected.scale) != (unpinned.architecture, unpinned.scale):
                raise ArchitectureMismatchError(
                    f"{what}: {model_id} is {unpinned.architecture} x{unpinned.scale}, "
                    f"this file is {detected.architecture} x{detected.scale}"
                )
            return dataclasses.replace(unpinned, sha256=sha, bytes=size)
        return ModelSpec(
            id=model_id,
            url=None,
            sha256=sha,
            bytes=size,
            architecture=detected.architecture,
            scale=detected.scale,
            purpose=detected.purpose,
            licence=licence or "unknown",
            filename=f"custom/{model_id}{suffix}",
            loader=detected.loader,
            variant=detected.variant,
            origin="custom",
        )

    def remove(self, model_id: str) -> None:
        """Delete a model's cached file; a custom model's record goes too (pins are kept)."""
        with self._catalogue.transaction() as catalogue:
            spec = self._specs_from(catalogue).get(model_id)
            if spec is None:
                raise UnknownModelError(f"{model_id!r} is not a known model id")
            catalogue["custom"].pop(model_id, None)
            self.path_for(spec).unlink(missing_ok=True)

    # --- verify

    def verify(self) -> list[VerifyResult]:
        """Re-hash every cached file against its expected sha256.

        Official models never fetched are not reported; a custom model whose file has vanished
        is ("missing"), as is a file for an official model with no hash pinned ("unpinned").
        """
        results = []
        for spec in self.specs().values():
            path = self.path_for(spec)
            if not path.is_file():
                if spec.origin == "custom":
                    results.append(VerifyResult(spec, path, "missing", None))
                continue
            actual = sha256_file(path)
            if spec.sha256 is None:
                status: VerifyStatus = "unpinned"
            else:
                status = "ok" if actual == spec.sha256 else "mismatch"
            results.append(VerifyResult(spec, path, status, actual))
        return results

    # --- load

    def load(
        self,
        ref: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LoadedModel:
        """Hash-check, then build the model on `device` in `dtype` (float32 by default).

        Memoised by (sha256, device, dtype): stages asking for the same weights share one copy.
        """
        import torch

        resolved = self.resolve(ref)
        target = torch.device(device)
        precision = dtype or torch.float32
        key = (resolved.sha256, str(target), str(precision))
        with self._lock:
            key_lock = self._load_locks.setdefault(key, threading.Lock())
        with key_lock:  # one build per key; other keys load in parallel
            loaded = self._loaded.get(key)
            if loaded is None:
                loaded = self._build(resolved, target, precision)
                self._loaded[key] = loaded
        if loaded.id != resolved.id or loaded.path != resolved.path:
            loaded = dataclasses.replace(
                loaded, id=resolved.id, spec=resolved.spec, path=resolved.path
            )
        return loaded

    def _build(
        self, resolved: ResolvedModel, device: torch.device, dtype: torch.dtype
    ) -> LoadedModel:
        import spandrel
        import torch

        spec, what = resolved.spec, resolved.id
        state_dict, _ = _read_verified(resolved.path, resolved.sha256, what)
        descriptor = None
        if spec.loader == "spandrel":
            descriptor = _spandrel_descriptor(state_dict, device, f"{what} ({resolved.path})")
            _check_descriptor(spec, descriptor, f"{what} ({resolved.path})")
            try:
                descriptor.to(dtype)
            except spandrel.UnsupportedDtypeError as exc:
                raise ModelError(f"{what}: {spec.architecture} cannot run in {dtype}") from exc
            module = descriptor.model
        else:
            if dtype != torch.float32:
                raise ModelError(f"{what}: {spec.architecture} models load in float32 only")
            module = _build_from_state_dict(
                spec.architecture, spec.variant, state_dict, device, f"{what} ({resolved.path})"
            )
        module.eval()
        module.requires_grad_(False)
        return LoadedModel(
            id=resolved.id,
            sha256=resolved.sha256,
            path=resolved.path,
            spec=spec,
            module=module,
            descriptor=descriptor,
            device=str(device),
            dtype=str(dtype),
        )

    def load_state_dict(
        self, ref: str | os.PathLike[str]
    ) -> tuple[dict[str, torch.Tensor], ResolvedModel]:
        """Hash-checked tensors on the CPU, unwrapped as upstream does; a fresh dict each call."""
        resolved = self.resolve(ref)
        state_dict, _ = _read_verified(resolved.path, resolved.sha256, resolved.id)
        return _unwrap_state_dict(state_dict, f"{resolved.id} ({resolved.path})"), resolved

    def clear_loaded(self) -> None:
        """Forget memoised models so their memory can be freed once no stage holds them."""
        with self._lock:
            self._loaded.clear()

    # Defined last: inside the class body the name `list` means this method from here on.
    def list(self) -> list[tuple[ModelSpec, str]]:
        """Every known model with "present" or "missing" (no hashing: `verify` does that)."""
        return [
            (spec, "present" if self.path_for(spec).is_file() else "missing")
            for spec in self.specs().values()
        ]
