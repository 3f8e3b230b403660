"""Converted models cached and trusted like weights: keyed by the source weights' SHA-256, the
engine, its converter's version and the input shape; written atomically; each file's SHA-256
recorded in a manifest and checked before an engine loads it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import HashMismatchError, ModelError
from pipeline.files import write_atomically

__all__ = ["ConvertedModel", "called_plainly", "converted_model"]

_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ConvertedModel:
    folder: Path
    files: dict[str, bytes]  # name -> the verified bytes
    sha256: dict[str, str]  # name -> hex digest
    converted: bool  # True when this call converted (False: taken from the cache)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def converted_model(
    cache_dir: Path, key: Mapping[str, Any], convert: Callable[[], dict[str, bytes]]
) -> ConvertedModel:
    """The converted files for `key`, from the cache (verified) or made by `convert` and stored.

    A cached file whose bytes no longer match the manifest is refused with HashMismatchError:
    like a tampered weights file it is never run, and never silently replaced.
    """
    name = _digest(json.dumps(dict(key), sort_keys=True).encode())[:24]
    folder = cache_dir / "converted" / str(key["engine"]) / name
    manifest_path = folder / _MANIFEST
    if manifest_path.exists():
        return _verified(folder, manifest_path)
    files = convert()
    hashes = {file: _digest(data) for file, data in files.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        write_atomically(folder / file, data)
    manifest = {"key": dict(key), "sha256": hashes}
    # The manifest goes last: a crash mid-way leaves no manifest, so the next run converts again.
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_atomically(manifest_path, text.encode())
    return ConvertedModel(folder, files, hashes, converted=True)


def _verified(folder: Path, manifest_path: Path) -> ConvertedModel:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        hashes = dict(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{manifest_path}: unreadable converted-model manifest: {exc}") from exc
    files = {}
    for file, expected in hashes.items():
        path = folder / file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: converted model file unreadable: {exc}") from exc
        actual = _digest(data)
        if actual != expected:
            raise HashMismatchError(f"converted model {path}", expected, actual)
        files[file] = data
    return ConvertedModel(folder, files, hashes, converted=False)


def called_plainly(descriptor: Any) -> bool:
    """True when spandrel calls the model as model(image) (its default), not with extra inputs
    or outputs (FBCNN's quality estimate, FDnCNN's noise map)."""
    call = getattr(descriptor, "_call_fn", None)
    return call is None or "ModelDescriptor.__init__" in getattr(call, "__qualname__", "")
