"""The cache's catalogue: custom models and pinned hashes in one JSON file (`models.json`),
rewritten atomically under an exclusive lock so a CLI and a daemon can share the cache."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import HashMismatchError, ModelError
from pipeline.files import write_atomically
from pipeline.models.spec import ModelSpec

__all__ = [
    "CATALOGUE_NAME",
    "Catalogue",
    "custom_record",
    "now",
    "official_to_pin",
    "spec_from_record",
]

CATALOGUE_NAME = "models.json"
_CATALOGUE_FORMAT = 1
# Custom ids become file names and CLI arguments: keep them to a safe, shell-friendly alphabet.
_CUSTOM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,79}")


class Catalogue:
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


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def custom_record(spec: ModelSpec, source: Path) -> dict[str, Any]:
    record = dataclasses.asdict(spec)
    for derived in ("id", "url", "origin"):
        del record[derived]
    record["imported_at"] = now()
    record["source_name"] = source.name
    return record


def spec_from_record(model_id: str, record: Mapping[str, Any], catalogue: Path) -> ModelSpec:
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


def official_to_pin(
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
