"""The model store: one cache folder of weights that it fetches, imports, verifies, resolves and
loads (memoised per file, device and dtype)."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import (
    ArchitectureMismatchError,
    ModelError,
    ModelNotAvailableError,
    UnknownModelError,
)
from pipeline.files import replace_durably, temp_beside
from pipeline.models.architectures import (
    Detected,
    build_from_state_dict,
    check_descriptor,
    detect,
    spandrel_descriptor,
)
from pipeline.models.catalogue import (
    CATALOGUE_NAME,
    Catalogue,
    custom_record,
    now,
    official_to_pin,
    spec_from_record,
)
from pipeline.models.download import download, hash_stream
from pipeline.models.loading import deserialize, is_safetensors, load_weights, unwrap_state_dict
from pipeline.models.registry import REGISTRY
from pipeline.models.spec import ModelSpec, ResolvedModel
from pipeline.models.trust import check_sha256, fingerprint, read_trusted

if TYPE_CHECKING:
    import torch
    from spandrel import ImageModelDescriptor

__all__ = ["LoadedModel", "ModelStore", "VerifyResult", "VerifyStatus", "default_cache_dir"]

_log = logging.getLogger(__name__)
# Weights trained by this project and shipped with it (registry entries of origin "package").
PACKAGED_WEIGHTS = Path(__file__).resolve().parent / "weights"

VerifyStatus = Literal["ok", "mismatch", "missing", "unpinned"]


def default_cache_dir() -> Path:
    """$SCANRESTORE_CACHE_DIR, else $XDG_CACHE_HOME/scanrestore/models, else ~/.cache/..."""
    explicit = os.environ.get("SCANRESTORE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "scanrestore" / "models"


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
            if key != spec.id or spec.origin not in ("official", "package"):
                raise ValueError(
                    f"registry entry {key!r} must be an official or packaged spec with that id"
                )
        self.cache_dir = Path(cache_dir)
        self.registry = registry
        self._urlopen = urlopen
        self._timeout = timeout
        self.auto_fetch = auto_fetch  # fetch a missing official model on first resolve
        self._catalogue = Catalogue(self.cache_dir / CATALOGUE_NAME)
        self._loaded: dict[tuple[str, str, str], LoadedModel] = {}
        self._load_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._detected: dict[str, Detected] = {}  # file refs, by sha256

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
        """Where the spec's file lives (or would live) in the cache; packaged weights live in
        the package itself."""
        if spec.origin == "package":
            return PACKAGED_WEIGHTS / spec.filename
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
                specs[model_id] = spec_from_record(
                    model_id, catalogue["custom"][model_id], self._catalogue.path
                )
        return specs

    # --- resolve

    def resolve(self, ref: str | os.PathLike[str], *, sha256: str | None = None) -> ResolvedModel:
        """Turn a model id, or a path to a weights file, into a file and its expected hash.

        `sha256` is a hash already bound to `ref` (see `pipeline.models.trust`): a path is then
        not hashed again, and an id whose pinned hash is no longer that one is refused.
        """
        text = os.fspath(ref)
        specs = self.specs()
        if text in specs:
            resolved = self._resolve_spec(specs[text])
            if sha256 is not None:
                check_sha256(f"{resolved.id} ({resolved.path})", sha256, resolved.sha256)
            return resolved
        candidate = Path(text).expanduser()
        if candidate.is_file():
            return self._resolve_file(candidate, specs, sha256)
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

    def _resolve_file(
        self, path: Path, specs: Mapping[str, ModelSpec], sha256: str | None
    ) -> ResolvedModel:
        path = path.resolve()
        sha = sha256 or fingerprint(path)
        for spec in specs.values():
            if spec.sha256 == sha:  # a copy of a known model keeps that model's id and licence
                return ResolvedModel(spec.id, spec, path, sha)
        detected = self._detected.get(sha)
        if detected is None:
            detected = detect(load_weights(path, sha, f"file:{path.name}"), str(path))
            self._detected[sha] = detected
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
        if spec.origin == "package":
            return self.path_for(spec)  # shipped with scanrestore: nothing to download
        if spec.url is None:
            raise ModelError(
                f"{model_id}: custom models have no download URL; "
                "re-import the file with `scanrestore models import FILE`"
            )
        final = self.path_for(spec)
        if spec.sha256 is not None and final.is_file():
            actual = fingerprint(final)
            if actual == spec.sha256:
                return final
            _log.warning(
                "%s: cached %s has sha256 %s, expected %s; downloading it again",
                model_id,
                final,
                actual,
                spec.sha256,
            )
        sha, size = download(
            spec, final, urlopen=self._urlopen, timeout=self._timeout, progress=progress
        )
        if spec.sha256 is None:
            with self._catalogue.transaction() as catalogue:
                self._pin(catalogue, spec.id, sha, size)
        return final

    def _pin(self, catalogue: dict[str, Any], model_id: str, sha: str, size: int) -> None:
        _log.info("%s: no published sha256; pinning %s", model_id, sha)
        catalogue["pinned"][model_id] = {"sha256": sha, "bytes": size, "pinned_at": now()}

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
                sha, size = hash_stream(reader, handle)
            handle.flush()
            with self._catalogue.transaction() as catalogue:
                specs = self._specs_from(catalogue)
                known = next((s for s in specs.values() if s.sha256 == sha), None)
                if known is not None and known.origin == "package":
                    return known  # shipped with the package already; never written into it
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
                    catalogue["custom"][spec.id] = custom_record(spec, source)
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
        unpinned = official_to_pin(source, sha, model_id, specs)
        assert model_id is not None  # official_to_pin refuses a missing id
        what = f"{source} (importing as {model_id})"
        data = read_trusted(staged, sha, what)  # the bytes hashed as they were copied
        detected = detect(deserialize(data, what), what)
        suffix = ".safetensors" if is_safetensors(data[:16]) else ".pth"
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
            if spec.origin == "package":
                raise ModelError(f"{model_id}: shipped with scanrestore; it cannot be removed")
            catalogue["custom"].pop(model_id, None)
            self.path_for(spec).unlink(missing_ok=True)

    # --- verify

    def verify(self) -> list[VerifyResult]:
        """Re-hash every cached file against its expected sha256.

        Official models never fetched are not reported; a custom or packaged model whose file
        has vanished is ("missing"), as is a file for an official model with no hash pinned
        ("unpinned").
        """
        results = []
        for spec in self.specs().values():
            path = self.path_for(spec)
            if not path.is_file():
                if spec.origin in ("custom", "package"):  # a broken install is news too
                    results.append(VerifyResult(spec, path, "missing", None))
                continue
            actual = fingerprint(path)
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
        sha256: str | None = None,
    ) -> LoadedModel:
        """Build the model on `device` in `dtype` (float32 by default) from bytes checked against
        its hash (`sha256`: one bound earlier, see `resolve`).

        Memoised by (sha256, device, dtype): stages asking for the same weights share one copy.
        """
        import torch

        resolved = self.resolve(ref, sha256=sha256)
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
        state_dict = load_weights(resolved.path, resolved.sha256, what)
        descriptor = None
        if spec.loader == "spandrel":
            descriptor = spandrel_descriptor(state_dict, device, f"{what} ({resolved.path})")
            check_descriptor(spec, descriptor, f"{what} ({resolved.path})")
            try:
                descriptor.to(dtype)
            except spandrel.UnsupportedDtypeError as exc:
                raise ModelError(f"{what}: {spec.architecture} cannot run in {dtype}") from exc
            module = descriptor.model
        else:
            if dtype != torch.float32:
                raise ModelError(f"{what}: {spec.architecture} models load in float32 only")
            module = build_from_state_dict(
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
        self, ref: str | os.PathLike[str], *, sha256: str | None = None
    ) -> tuple[dict[str, torch.Tensor], ResolvedModel]:
        """Hash-checked tensors on the CPU, unwrapped as upstream does; a fresh dict each call."""
        resolved = self.resolve(ref, sha256=sha256)
        state_dict = load_weights(resolved.path, resolved.sha256, resolved.id)
        return unwrap_state_dict(state_dict, f"{resolved.id} ({resolved.path})"), resolved

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
