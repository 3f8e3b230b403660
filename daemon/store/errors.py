"""The errors the store raises on purpose."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["BackupExistsError", "SchemaTooNewError", "StoreError", "UnknownReferenceError"]


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer scanrestore: `unknown` names its migrations."""

    def __init__(self, path: Path, unknown: Sequence[str]) -> None:
        self.path = path
        self.unknown = tuple(unknown)
        super().__init__(
            f"{path}: written by a newer scanrestore (unknown migrations: "
            f"{', '.join(self.unknown)}); upgrade scanrestore or open a backup"
        )


class BackupExistsError(StoreError, FileExistsError):
    """A backup is never written over an existing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path}: already exists; a backup never overwrites a file")


class UnknownReferenceError(StoreError):
    """A record names a source or recipe that was never recorded."""
