"""Versioned outputs: `<stem>.v<N><suffix>`, written to a temporary file in the destination,
fsynced, then published under a version number that has never been used; never overwritten."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from pipeline.files import fsync_dir, fsync_file, link_no_replace

__all__ = [
    "TEMP_MARKER",
    "existing_versions",
    "publish_version",
    "temp_name",
    "temp_prefix",
]

TEMP_MARKER = ".tmp-"  # temporary files are "._<name>.tmp-<random>"; watchers ignore them
_NAME_MAX = 255  # bytes in one file name, on every filesystem we write to
_LONG_STEM = _NAME_MAX - 40  # leaves room for "._", ".mask.png", the marker and the random part


def temp_prefix(stem: str) -> str:
    """How every temporary file of `stem` begins: "._<stem>.". A stem too long to take the
    suffix and marker within 255 bytes is replaced by its hash: only final names carry it."""
    if len(os.fsencode(stem)) > _LONG_STEM:
        return f"._{hashlib.sha256(os.fsencode(stem)).hexdigest()[:32]}."
    return f"._{stem}."


def temp_name(stem: str, suffix: str) -> str:
    """A fresh temporary file name for `<stem><suffix>` (suffix with its leading dot)."""
    return f"{temp_prefix(stem)}{suffix.removeprefix('.')}{TEMP_MARKER}{secrets.token_hex(4)}"


def existing_versions(directory: Path, stem: str) -> set[int]:
    """Version numbers already taken by `stem` in `directory`, whatever their suffix."""
    pattern = re.compile(re.escape(stem) + r"\.v(\d+)\.[^.]+")
    taken = set()
    if directory.is_dir():
        for entry in os.scandir(directory):
            match = pattern.fullmatch(entry.name)
            if match:
                taken.add(int(match.group(1)))
    return taken


def publish_version(
    directory: Path, stem: str, suffix: str, write: Callable[[Path], object], *, minimum: int = 1
) -> tuple[Path, int]:
    """Write via `write(temp_path)` and publish as the next free version >= `minimum`.

    The temporary file lives in the destination folder so the final rename is atomic. A
    hard link publishes without ever replacing an existing file; on filesystems without hard
    links (some SMB shares) we fall back to an existence check plus rename, safe because a
    single daemon instance owns the output tree.
    """
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / temp_name(stem, suffix)
    try:
        write(temp)
        fsync_file(temp)
        version = max(existing_versions(directory, stem), default=minimum - 1) + 1
        version = max(version, minimum)
        while True:
            final = directory / f"{stem}.v{version}{suffix}"
            if link_no_replace(temp, final):
                break
            version += 1
        fsync_dir(directory)
        return final, version
    finally:
        temp.unlink(missing_ok=True)
